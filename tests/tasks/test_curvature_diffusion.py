"""tasks.curvature_diffusion against ITK's own filter: the same float32 voxels, bit for bit.

The reference is SimpleITK's ``CurvatureAnisotropicDiffusionImageFilter`` at one thread with
the same settings. Cases cover the block layout's edge cases (one slice, one row, one
column, rows split into uneven blocks), anisotropic spacing, 1 and 5 iterations, two
conductances, a constant image (ITK's conductance scale is 0: nothing changes) and a real
ProstateX T2 (skipped when ``../shared/data`` is absent).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tasks.curvature_diffusion import curvature_diffusion
from tasks.denoise import T2DenoiseParams, denoise_t2, stable_time_step
from tasks.discover import discover_exams
from tasks.ingest import ingest_exam

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"


def itk_diffusion(image: sitk.Image, iterations: int, conductance: float, step: float):
    flt = sitk.CurvatureAnisotropicDiffusionImageFilter()
    flt.SetNumberOfIterations(iterations)
    flt.SetConductanceParameter(conductance)
    flt.SetTimeStep(step)
    flt.SetNumberOfThreads(1)
    return sitk.GetArrayFromImage(flt.Execute(sitk.Cast(image, sitk.sitkFloat32)))


def numpy_diffusion(image: sitk.Image, iterations: int, conductance: float, step: float):
    return curvature_diffusion(
        sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)),
        image.GetSpacing()[::-1],
        iterations=iterations,
        conductance=conductance,
        time_step=step,
    )


def synthetic(size_xyz, spacing, seed: int, smooth: bool) -> sitk.Image:
    rng = np.random.default_rng(seed)
    shape = size_xyz[::-1]
    if smooth:
        zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
        values = 500 + 300 * np.sin(xx / 7.0) * np.cos(yy / 5.0) + 50 * zz
        values = values + rng.normal(0, 20, shape)
    else:
        values = rng.random(shape) * 1000.0
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin((-12.5, 33.25, 7.0))
    return image


CASES = [
    ((5, 6, 3), (0.7, 0.45, 2.5), False),
    ((1, 4, 3), (0.5, 0.6, 3.0), False),  # one column
    ((7, 1, 2), (0.5, 0.6, 3.0), False),  # one row
    ((2, 2, 2), (1.0, 0.8, 1.3), False),
    ((17, 13, 11), (0.55, 0.625, 3.3), False),
    ((64, 48, 9), (0.5, 0.5, 3.0), True),
    ((300, 250, 1), (0.4, 0.7, 5.0), True),  # one slice, several row blocks
    ((10000, 7, 2), (0.5, 0.6, 2.0), False),  # row blocks of 3, 3 and 1
    ((200, 181, 3), (0.45, 0.55, 3.5), False),  # two uneven row blocks
]


@pytest.mark.parametrize(("size", "spacing", "smooth"), CASES)
@pytest.mark.parametrize(("iterations", "conductance"), [(1, 1.0), (5, 1.0), (5, 3.0)])
def test_equals_itk_voxel_for_voxel(size, spacing, smooth, iterations, conductance) -> None:
    image = synthetic(size, spacing, seed=sum(size), smooth=smooth)
    step = stable_time_step(spacing)
    ours = numpy_diffusion(image, iterations, conductance, step)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, itk_diffusion(image, iterations, conductance, step))


def test_constant_image_is_unchanged_and_input_untouched() -> None:
    values = np.full((4, 9, 8), 7.5, np.float32)
    out = curvature_diffusion(
        values, (3.0, 0.5, 0.5), iterations=5, conductance=1.0, time_step=0.03
    )
    np.testing.assert_array_equal(out, values)
    noisy = np.random.default_rng(0).random((4, 9, 8)).astype(np.float32)
    before = noisy.copy()
    out = curvature_diffusion(noisy, (3.0, 0.5, 0.5), iterations=5, conductance=1.0, time_step=0.03)
    np.testing.assert_array_equal(noisy, before)
    assert not np.array_equal(out, noisy)


def test_denoise_t2_gives_the_same_voxels_at_one_and_two_threads() -> None:
    image = synthetic((96, 80, 12), (0.5, 0.5, 3.0), seed=3, smooth=True)
    one = denoise_t2(image, params=T2DenoiseParams(threads=1))  # numpy
    two = denoise_t2(image, params=T2DenoiseParams(threads=2))  # ITK, 2 threads
    assert one.GetSpacing() == image.GetSpacing() and one.GetOrigin() == image.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(one), sitk.GetArrayFromImage(two))


@pytest.mark.skipif(not DATA.is_dir(), reason="real ProstateX data not found (../shared/data)")
def test_equals_itk_on_a_real_t2(tmp_path: Path) -> None:
    (exam,) = [e for e in discover_exams(DATA) if e.folder.startswith("ProstateX-0218/")]
    result = ingest_exam(exam, out_dir=tmp_path, key="k")
    (t2,) = [s for s in result.series if s.kind == "t2w"]
    image = sitk.ReadImage(str(tmp_path / t2.image), sitk.sitkFloat32)
    step = stable_time_step(image.GetSpacing())
    ours = numpy_diffusion(image, 5, 1.0, step)
    np.testing.assert_array_equal(ours, itk_diffusion(image, 5, 1.0, step))
