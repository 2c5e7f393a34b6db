"""Curvature anisotropic diffusion (MCDE) in numpy, equal to ITK's filter bit for bit.

A single-threaded re-implementation of ITK 5.4's ``CurvatureAnisotropicDiffusionImageFilter``
(the modified curvature diffusion equation of Whitaker & Xue 2001, with ITK's conductance
scaling, zero-flux boundaries and image spacing), rounding to float32 exactly where ITK does,
so its output equals SimpleITK's voxel for voxel (``tests/tasks/test_curvature_diffusion.py``).
Why it exists: at one thread it takes about a quarter of SimpleITK's time on a 0.5 mm T2
(``benchmarks/results/chain.md``), because each face flux is computed once (not twice per
voxel) in cache-sized blocks with reused buffers. :func:`tasks.denoise.denoise_t2` uses it
for one thread and ITK's multi-threaded filter otherwise.

Conventions: volumes are (z, y, x) float32 arrays (``sitk.GetArrayFromImage``); spacings are
(z, y, x) in mm, the reverse of ``image.GetSpacing()``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["curvature_diffusion"]

_F32 = np.float32
_F64 = np.float64
_MIN_NORM = 1.0e-10  # ITK's m_MIN_NORM under the square root of the gradient magnitude
_BLOCK_VOXELS = 32_768  # target voxels per work block (work buffers stay in L2 cache)


def _central_diff_inplane(src: np.ndarray, axis: int, out32: np.ndarray) -> None:
    """``out32 = fl32(src[k+1] - src[k-1])`` along ``axis`` (1 or 2), indices clamped.

    Clamped indices are ITK's zero-flux boundary.
    """
    n = src.shape[axis]
    if n == 1:
        out32.fill(0.0)
        return

    def sl(a: int | None, b: int | None) -> tuple[slice, ...]:
        idx = [slice(None)] * 3
        idx[axis] = slice(a, b)
        return tuple(idx)

    if n > 2 and axis == 2 and src.flags.c_contiguous and out32.flags.c_contiguous:
        # flat shifted difference (fast contiguous loop); the wrapped-around values at the
        # row ends are overwritten by the one-sided boundary differences below
        sf, of = src.reshape(-1), out32.reshape(-1)
        np.subtract(sf[2:], sf[:-2], out=of[1:-1])
    elif n > 2:
        np.subtract(src[sl(2, None)], src[sl(None, -2)], out=out32[sl(1, -1)])
    np.subtract(src[sl(1, 2)], src[sl(0, 1)], out=out32[sl(0, 1)])
    np.subtract(src[sl(n - 1, n)], src[sl(n - 2, n - 1)], out=out32[sl(n - 1, n)])


def _apply_and_average_gradient(
    u: np.ndarray,
    upd: np.ndarray | None,
    scale_zyx: tuple[float, float, float],
    b32: np.ndarray,
    b64: np.ndarray,
) -> float:
    """Apply ``u += upd`` (if given), then return ITK's average squared gradient magnitude of u.

    mean over voxels of sum_i (fl32(u[p+e_i] - u[p-e_i]) / 2 * scale_i)^2 (indices clamped).
    Works slice by slice so that each freshly updated slice is still in cache; the z
    difference of slice z is taken once slice z+1 has been updated.
    """
    nz = u.shape[0]
    d32 = b32[: u[0].size].reshape(u.shape[1:])
    d64 = b64[: u[0].size]
    sums = [0.0, 0.0, 0.0]

    def zdiff(z: int) -> None:
        np.subtract(u[min(z + 1, nz - 1)], u[max(z - 1, 0)], out=d32)
        np.copyto(d64, d32.reshape(-1))
        sums[0] += float(np.dot(d64, d64))

    for z in range(nz):
        sl = u[z : z + 1]
        if upd is not None:
            np.add(sl, upd[z : z + 1], out=sl)
        for axis in (2, 1):
            _central_diff_inplane(sl, axis, d32[None])
            np.copyto(d64, d32.reshape(-1))
            sums[axis] += float(np.dot(d64, d64))
        if z >= 1:
            zdiff(z - 1)
    zdiff(nz - 1)
    total = sum(0.25 * s * c * c for s, c in zip(sums, scale_zyx, strict=True))
    return total / u.size


def _flux(
    d: np.ndarray,
    pairs: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    k: float,
    g: np.ndarray,
    w: np.ndarray,
    out: np.ndarray,
) -> None:
    """Conductance-weighted normalised face flux ``out = d / sqrt(eps + G) * exp(G / k)``.

    ``d``: scaled one-sided difference across the face; ``pairs``: for the two other axes
    (ITK's dimension order), the halved scaled central differences on both sides of the face,
    so that ``(a + b)^2 == 0.25 * (dx + dx')^2`` exactly.
    """
    np.multiply(d, d, out=g)
    for a, b in pairs:
        np.add(a, b, out=w)
        np.multiply(w, w, out=w)
        np.add(g, w, out=g)
    np.divide(g, k, out=w)
    np.exp(w, out=w)
    np.add(g, _MIN_NORM, out=g)
    np.sqrt(g, out=g)
    np.divide(d, g, out=out)
    np.multiply(out, w, out=out)


def curvature_diffusion(
    volume: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    iterations: int,
    conductance: float,
    time_step: float,
) -> np.ndarray:
    """Modified curvature diffusion (MCDE) of a 3D volume, as ITK 5.4 / SimpleITK computes it.

    The same float32 voxels as ``sitk.CurvatureAnisotropicDiffusionImageFilter`` with
    ``NumberOfIterations=iterations``, ``ConductanceParameter=conductance``,
    ``TimeStep=time_step``, ``ConductanceScalingUpdateInterval=1`` and image spacing used
    (ITK 5's default), applied to the float32 image.

    Conventions: ``volume`` is a (z, y, x) array as from ``sitk.GetArrayFromImage`` (cast to
    float32); ``spacing_zyx`` is the physical voxel size (e.g. mm) in the same (z, y, x) order,
    i.e. ``image.GetSpacing()[::-1]``; ``time_step`` is in the same units as the spacing
    (ITK's stability limit is min(spacing) / 2**(dim + 1)). Origin and direction play no role.

    Scheme, per iteration:
    ``K = -2 * conductance**2 * mean_p sum_i (central_diff_i / spacing_i)**2``
    (rounded to float32); for every voxel and axis i the forward / backward face fluxes
    ``d_i / sqrt(1e-10 + G) * exp(G / K)`` with
    ``G = d_i**2 + sum_{j != i} ((c_j + c_j') / 2)**2``
    (one-sided difference ``d_i``, central differences ``c_j`` at the voxel and at its i-neighbour,
    all divided by the spacing); ``speed = sum_i (flux_fwd - flux_bwd)``; the update is
    ``speed * |upwind gradient|`` (Osher-Sethian upwinding on the sign of ``speed``), rounded to
    float32 and applied explicitly: ``u += float32(update * time_step)``. Boundaries are zero-flux
    Neumann (edge voxels replicated). Arithmetic is float64 except where ITK rounds to float32
    (pixel differences, the update, ``K``, the image). Returns a new float32 array.
    """
    u = np.array(volume, dtype=_F32, order="C", copy=True)
    if u.ndim != 3:
        raise ValueError(f"expected a 3D (z, y, x) volume, got shape {u.shape}")
    nz, ny, nx = u.shape
    if u.size == 0 or iterations <= 0:
        return u
    scale = tuple(1.0 / float(s) for s in spacing_zyx)  # ITK's m_ScaleCoefficients (z, y, x)
    sz, sy, sx = (_F64(s) for s in scale)
    qz, qy, qx = (_F64(0.25 * s) for s in scale)  # halved scaled central differences
    dt = _F64(time_step)

    # Blocks: rows [y0, y1) x all x, swept along z in slabs of t slices, each voxel's update
    # computed from the (old) image; the whole update is applied at the end of the iteration.
    # Face arrays are flat ("face after voxel / row"), so that forward and backward faces of
    # all voxels are two contiguous shifted views.  Layout invariant: a block's core rows and
    # extended rows (core plus one halo row each side) are contiguous (t == 1 or full slices).
    n_yblocks = min(max(1, -(-ny * nx // _BLOCK_VOXELS)), ny)
    hmax = -(-ny // n_yblocks)
    tmax = 1 if n_yblocks > 1 else max(1, min(nz, _BLOCK_VOXELS // (ny * nx)))
    hemax = min(hmax + 2, ny)
    cap = (tmax + 1) * (hemax + 1) * nx + 1
    pool: dict[str, np.ndarray] = {}

    def buf(name: str, n: int, dtype: type = _F64) -> np.ndarray:
        """Flat view of length ``n`` on a preallocated work buffer."""
        b = pool.get(name)
        if b is None:
            b = pool[name] = np.empty(cap, dtype)
        return b[:n]

    upd = np.empty_like(u)  # float32(update * dt), applied once the whole iteration is computed
    plane32 = np.empty(ny * nx, _F32)
    plane64 = np.empty(ny * nx, _F64)
    pending = False
    for _ in range(iterations):
        avg = _apply_and_average_gradient(u, upd if pending else None, scale, plane32, plane64)
        pending = False
        k = float(_F32(avg * float(conductance) * float(conductance) * -2.0))
        if k == 0.0:  # ITK: zero conductance terms -> zero update everywhere
            continue
        kk = _F64(k)
        for y0 in range(0, ny, hmax):
            y1 = min(y0 + hmax, ny)
            h = y1 - y0
            ylo, yhi = max(y0 - 1, 0), min(y1 + 1, ny)
            ne = yhi - ylo  # extended rows
            r0 = y0 - ylo  # first core row within the extended rows
            ext = u[:, ylo:yhi, :]
            core = u[:, y0:y1, :]
            pe, pc = ne * nx, h * nx  # voxels per slice: extended / core
            # carried state at slice 0: halved scaled in-plane central differences
            ax_all = buf("ax", (tmax + 1) * pe)
            ay_all = buf("ay", (tmax + 1) * pc)
            w32 = buf("w32", pe, _F32).reshape(1, ne, nx)
            _central_diff_inplane(ext[0:1], 2, w32)
            np.multiply(w32.reshape(-1), qx, out=ax_all[:pe])
            _central_diff_inplane(ext[0:1], 1, w32)
            np.multiply(w32[:, r0 : r0 + h].reshape(-1), qy, out=ay_all[:pc])
            fz_all = buf("fz", (tmax + 1) * pc)
            dz_all = buf("dz", (tmax + 1) * pc)
            fz_all[:pc] = 0.0
            dz_all[:pc] = 0.0
            for z0 in range(0, nz, tmax):
                z1 = min(z0 + tmax, nz)
                t = z1 - z0
                n = t * pc  # core voxels in this block
                ne_t = t * pe  # extended voxels in this block
                ax = ax_all[: (t + 1) * pe]  # slices z0 .. z1 (z1 if it exists), extended rows
                ay = ay_all[: (t + 1) * pc]  # slices z0 .. z1, core rows
                nxt = min(z1 + 1, nz) - z1  # 1 if slice z1 exists
                # in-plane central differences of slices z0+1 .. z1 (slice z0 carried)
                m = t - 1 + nxt
                if m > 0:
                    src = ext[z0 + 1 : z0 + 1 + m]
                    w = buf("w32", m * pe, _F32).reshape(m, ne, nx)
                    _central_diff_inplane(src, 2, w)
                    np.multiply(w.reshape(-1), qx, out=ax[pe : pe + m * pe])
                    _central_diff_inplane(src, 1, w)
                    np.multiply(w[:, r0 : r0 + h], qy, out=ay[pc : pc + m * pc].reshape(m, h, nx))
                # z central differences of slices z0 .. z1-1, extended rows
                az = buf("az", ne_t)
                w = buf("w32", ne_t, _F32).reshape(t, ne, nx)
                for j, z in enumerate(range(z0, z1)):
                    np.subtract(ext[min(z + 1, nz - 1)], ext[max(z - 1, 0)], out=w[j])
                np.multiply(w.reshape(-1), qz, out=az)
                az3 = az.reshape(t, ne, nx)

                # ---- z faces: face j (j = 0 .. t) lies between slices z0+j-1 and z0+j
                fz = fz_all[: (t + 1) * pc]
                dz = dz_all[: (t + 1) * pc]
                nf = min(t, nz - 1 - z0)  # interior faces j = 1 .. nf
                if nf > 0:
                    w = buf("w32", nf * pc, _F32).reshape(nf, h, nx)
                    np.subtract(core[z0 + 1 : z0 + 1 + nf], core[z0 : z0 + nf], out=w)
                    dzv = dz[pc : pc + nf * pc]
                    np.multiply(w.reshape(-1), sz, out=dzv)
                    axc = ax.reshape(t + 1, ne, nx)[:, r0 : r0 + h]
                    ayc = ay.reshape(t + 1, h, nx)
                    shp = (nf, h, nx)
                    _flux(
                        dzv.reshape(shp),
                        ((axc[:nf], axc[1 : 1 + nf]), (ayc[:nf], ayc[1 : 1 + nf])),
                        kk,
                        buf("g", nf * pc).reshape(shp),
                        buf("w", nf * pc).reshape(shp),
                        fz[pc : pc + nf * pc].reshape(shp),
                    )
                if nf < t:
                    fz[t * pc :] = 0.0
                    dz[t * pc :] = 0.0

                # ---- x faces, flat: dxf[1 + i] / fxf[1 + i] is the face after core voxel i
                dxf = buf("dx", n + 1)
                fxf = buf("fx", n + 1)
                if nx > 1:
                    cflat = core[z0:z1].reshape(-1)  # contiguous by the layout invariant
                    w = buf("w32", n - 1, _F32)
                    np.subtract(cflat[1:], cflat[:-1], out=w)
                    np.multiply(w, sx, out=dxf[1:n])
                    dxf[0] = 0.0
                    dxf[n] = 0.0
                    dxf[1:].reshape(t * h, nx)[:, nx - 1] = 0.0  # boundary faces x = nx-1
                    ayf = ay[:n]  # core rows of slices z0 .. z1-1
                    azc = az if r0 == 0 and ne == h else az3[:, r0 : r0 + h].reshape(-1)
                    _flux(
                        dxf[1:n],
                        ((ayf[:-1], ayf[1:]), (azc[:-1], azc[1:])),
                        kk,
                        buf("g", n - 1),
                        buf("w", n - 1),
                        fxf[1:n],
                    )
                    fxf[0] = 0.0
                    fxf[n] = 0.0
                else:
                    dxf.fill(0.0)
                    fxf.fill(0.0)

                # ---- y faces, flat over extended rows: row R of dyf[nx:] / fyf[nx:] holds the
                # faces after extended row R (R = slice * ne + r); a leading zero row precedes
                dyf = buf("dy", ne_t + nx)
                fyf = buf("fy", ne_t + nx)
                dyf[:nx] = 0.0
                fyf[:nx] = 0.0
                if ne > 1:
                    eflat = ext[z0:z1].reshape(-1)
                    ln = ne_t - nx
                    w = buf("w32", ln, _F32)
                    np.subtract(eflat[nx:], eflat[:-nx], out=w)
                    np.multiply(w, sy, out=dyf[nx : nx + ln])
                    dyf[nx + ln :] = 0.0
                    fyf[nx + ln :] = 0.0
                    # faces after the last extended row of a slice: boundary or unused
                    dyf[nx:].reshape(t, ne, nx)[:, ne - 1, :] = 0.0
                    _flux(
                        dyf[nx : nx + ln],
                        ((ax[:ln], ax[nx : nx + ln]), (az[:ln], az[nx : nx + ln])),
                        kk,
                        buf("g", ln),
                        buf("w", ln),
                        fyf[nx : nx + ln],
                    )
                else:
                    dyf.fill(0.0)
                    fyf.fill(0.0)
                # core voxels: forward y face = after ext row r0 + j, backward = after r0 + j - 1
                yb, yf = r0 * nx, (r0 + 1) * nx

                # ---- speed = sum over x, y, z of (forward flux - backward flux), ITK's order
                spd = buf("spd", n)
                tmp = buf("t1", n)
                tmp2 = buf("t2", n)
                np.subtract(fxf[1:], fxf[:-1], out=spd)
                np.subtract(fyf[yf : yf + n], fyf[yb : yb + n], out=tmp)
                np.add(spd, tmp, out=spd)
                np.subtract(fz[pc:], fz[:-pc], out=tmp)
                np.add(spd, tmp, out=spd)

                # ---- upwind gradient magnitude: speed > 0 -> min(b,0)^2 + max(f,0)^2, else
                # max(b,0)^2 + min(f,0)^2  ==  min(sg*b,0)^2 + max(sg*f,0)^2, sg = sign(speed)
                # (speed == 0 gives a zero update whichever branch is taken)
                sg = buf("sg", n)
                np.copysign(1.0, spd, out=sg)
                pg = buf("pg", n)
                for n_ax, (bwd, fwd) in enumerate(
                    (
                        (dxf[:-1], dxf[1:]),
                        (dyf[yb : yb + n], dyf[yf : yf + n]),
                        (dz[:-pc], dz[pc:]),
                    )
                ):
                    np.multiply(bwd, sg, out=tmp)
                    np.minimum(tmp, 0.0, out=tmp)
                    np.multiply(tmp, tmp, out=tmp)
                    np.multiply(fwd, sg, out=tmp2)
                    np.maximum(tmp2, 0.0, out=tmp2)
                    np.multiply(tmp2, tmp2, out=tmp2)
                    if n_ax == 0:
                        np.add(tmp, tmp2, out=pg)
                    else:
                        np.add(tmp, tmp2, out=tmp)
                        np.add(pg, tmp, out=pg)
                np.sqrt(pg, out=pg)
                np.multiply(pg, spd, out=pg)
                up = buf("up32", n, _F32)
                np.copyto(up, pg, casting="same_kind")  # ITK: static_cast<float>(update)
                np.multiply(up, dt, out=pg)  # double(update) * dt
                np.copyto(
                    upd[z0:z1, y0:y1], pg.reshape(t, h, nx), casting="same_kind"
                )  # float32(update * dt)

                # carry slice z1 / face z1-1|z1 to the next slab
                if z1 < nz:
                    ax[:pe] = ax[t * pe :]
                    ay[:pc] = ay[t * pc :]
                    fz[:pc] = fz[t * pc :]
                    dz[:pc] = dz[t * pc :]
        pending = True
    if pending:
        np.add(u, upd, out=u)
    return u
