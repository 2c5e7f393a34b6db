"""Known defects put into one exam's QC inputs, to check that QC flags each of them.

Each function takes the clean :class:`tasks.qc_metrics.QcImages` of an exam (the pipeline's
own outputs) and returns them with one defect:

- :func:`misregistered`: the T2 -> DWI map off by a translation (mm, LPS);
- :func:`cut_off_top`: the T2 field of view (and every T2-grid image) ending inside the
  gland, so the mask reaches the top slice;
- :func:`two_components`: a second, separate blob added to the mask;
- :func:`eroded`: the mask eroded in-plane until it lost a fraction of its volume.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from tasks.qc_metrics import QcImages


def misregistered(images: QcImages, shift_mm: tuple[float, float, float]) -> QcImages:
    """The T2 -> DWI map followed by a translation of ``shift_mm`` (a failed registration)."""
    if images.t2_to_dwi is None:
        raise ValueError("the exam has no T2 -> DWI map")
    moved = sitk.AffineTransform(images.t2_to_dwi)
    moved.Translate(shift_mm)
    return dataclasses.replace(images, t2_to_dwi=moved)


def _crop(image: sitk.Image | None, stop: int, superior_last: bool) -> sitk.Image | None:
    if image is None:
        return None
    size = list(image.GetSize())
    if superior_last:
        return image[:, :, :stop]
    return image[:, :, size[2] - stop :]


def cut_off_top(images: QcImages, keep_fraction: float = 0.6) -> QcImages:
    """Every T2-grid image cropped so that the top (most superior) slice cuts the gland at
    ``keep_fraction`` of its slices from the apex."""
    gland = sitk.GetArrayViewFromImage(images.mask) != 0
    held = np.flatnonzero(gland.any(axis=(1, 2)))
    direction = np.asarray(images.t2.GetDirection()).reshape(3, 3)
    superior_last = direction[2, 2] > 0  # z rises with k
    ordered = held if superior_last else held[::-1]
    top = int(ordered[int(len(ordered) * keep_fraction)])
    n = gland.shape[0]
    stop = top + 1 if superior_last else n - top

    def crop(image: sitk.Image | None) -> sitk.Image | None:
        return _crop(image, stop, superior_last)

    return dataclasses.replace(
        images,
        t2=crop(images.t2),
        mask=crop(images.mask),
        adc=crop(images.adc),
        b1000=crop(images.b1000),
        others={name: crop(m) for name, m in images.others.items()},
    )


def two_components(images: QcImages, blob_ml: float = 2.0, gap_mm: float = 15.0) -> QcImages:
    """A spherical blob of ``blob_ml`` added ``gap_mm`` beyond the gland's left edge."""
    labels = sitk.GetArrayFromImage(images.mask)
    spacing = np.asarray(images.mask.GetSpacing())[::-1]  # (z, y, x) mm
    where = np.argwhere(labels > 0)
    centre = where.mean(0)
    radius_mm = (3 * blob_ml * 1000 / (4 * np.pi)) ** (1 / 3)
    right = where[:, 2].max() + (gap_mm + radius_mm) / spacing[2]
    centre[2] = min(right, labels.shape[2] - 1 - radius_mm / spacing[2])
    grid = np.indices(labels.shape).astype(float)
    distance = np.sqrt(sum(((grid[a] - centre[a]) * spacing[a]) ** 2 for a in range(3)))
    labels[(distance <= radius_mm) & (labels == 0)] = labels[labels > 0].max()
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(images.mask)
    return dataclasses.replace(images, mask=mask)


def eroded(images: QcImages, lost_fraction: float = 0.25) -> QcImages:
    """The mask eroded in-plane (4-connected, one voxel at a time) until at least
    ``lost_fraction`` of its volume is gone."""
    labels = sitk.GetArrayFromImage(images.mask)
    kept = labels > 0
    total = kept.sum()
    cross = np.zeros((3, 3, 3), bool)
    cross[1] = ndimage.generate_binary_structure(2, 1)
    while kept.sum() > (1 - lost_fraction) * total:
        kept = ndimage.binary_erosion(kept, structure=cross)
    mask = sitk.GetImageFromArray(np.where(kept, labels, 0).astype(labels.dtype))
    mask.CopyInformation(images.mask)
    return dataclasses.replace(images, mask=mask)
