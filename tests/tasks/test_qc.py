"""Tests for tasks.qc: apex/mid/base slices, a valid PNG of the stated size written
atomically, the empty-mask behaviour, grid checks and the display orientation."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib import image as mpimg

from tasks.errors import InputError
from tasks.qc import level_slices, qc_figure, radiological_slice

SPACING = (0.5, 0.5, 3.0)
SHAPE = (10, 40, 40)  # z, y, x
AREAS = (0, 12, 30, 64, 100, 81, 49, 16, 4, 0)  # mask pixels per slice: the largest is k = 4


def _image(array: np.ndarray, direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _t2() -> sitk.Image:
    rng = np.random.default_rng(0)
    return _image(rng.normal(400, 60, SHAPE).astype(np.float32))


def _mask(areas=AREAS, corner=(10, 10)) -> sitk.Image:
    labels = np.zeros(SHAPE, np.uint8)
    for k, area in enumerate(areas):
        side = int(round(area**0.5))
        labels[k, corner[0] : corner[0] + side, corner[1] : corner[1] + side] = 1
    return _image(labels)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc
        chunks.append((kind, body))
        offset += 12 + length
    return chunks


def test_three_levels_on_three_rows_and_a_valid_png(tmp_path: Path) -> None:
    path = tmp_path / "figures" / "qc.png"
    result = qc_figure(
        _t2(),
        _mask(),
        path,
        b1000=_t2(),
        adc=_t2(),
        reference=_mask(AREAS[::-1]),
        title="P0 demo",
        size_px=200,
    )
    assert result["slices"] == [2, 5, 7]  # mask on k = 1..8: 15 %, 50 %, 85 % of the way
    assert result["path"] == str(path) and result["empty"] is False
    data = path.read_bytes()
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    chunks = _png_chunks(data)
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert chunks[0][0] == b"IHDR" and (width, height) == (600, 628) == result["size"]
    assert chunks[-1][0] == b"IEND"
    text_keys = {body.split(b"\0")[0] for kind, body in chunks if kind in (b"tEXt", b"iTXt")}
    assert text_keys <= {b"Software"}  # no metadata beyond matplotlib's own tag
    pixels = mpimg.imread(path)
    assert pixels.shape[:2] == (628, 600) and pixels.std() > 0  # decodes, not blank
    assert sorted(p.name for p in path.parent.iterdir()) == ["qc.png"]  # no temp file left
    again = qc_figure(
        _t2(),
        _mask(),
        tmp_path / "again.png",
        b1000=_t2(),
        adc=_t2(),
        reference=_mask(AREAS[::-1]),
        title="P0 demo",
        size_px=200,
    )
    assert again["sha256"] == result["sha256"]  # deterministic bytes


def test_apex_is_inferior_whatever_the_slice_order() -> None:
    mask = sitk.GetArrayFromImage(_mask((0, 9, 25, 25, 4, 0, 0, 0, 0, 0))) > 0
    assert level_slices(mask, _t2()) == [1, 3, 4]  # k = 1..4, z rises with k
    flipped = _image(np.zeros(SHAPE, np.float32), direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    assert level_slices(mask, flipped) == [4, 2, 1]  # z falls with k: apex is the last k


def test_empty_prediction_is_drawn_not_refused(tmp_path: Path) -> None:
    empty = _mask((0,) * 10)
    alone = qc_figure(_t2(), empty, tmp_path / "alone.png")
    assert alone["empty"] is True and alone["slices"] == [SHAPE[0] // 2] * 3
    with_ref = qc_figure(_t2(), empty, tmp_path / "ref.png", reference=_mask())
    assert with_ref["empty"] is True and with_ref["slices"] == [2, 5, 7]  # the reference's
    assert mpimg.imread(tmp_path / "ref.png").shape[:2] == (256 + 28, 768)  # T2 row only


def test_masks_must_be_on_the_t2_grid(tmp_path: Path) -> None:
    shifted = _mask()
    shifted.SetOrigin((0.0, 3.0, 0.0))
    with pytest.raises(InputError, match="mask vs t2"):
        qc_figure(_t2(), shifted, tmp_path / "q.png")
    with pytest.raises(InputError, match="reference vs t2"):
        qc_figure(_t2(), _mask(), tmp_path / "q.png", reference=shifted)
    assert not (tmp_path / "q.png").exists()


def test_display_is_radiological_whatever_the_storage_order() -> None:
    values = np.zeros((3, 4, 5), np.float32)
    values[1, 0, 0] = 1.0  # index (i, j) = (0, 0) of slice 1
    lps = _image(values)  # i -> patient left, j -> posterior: stored radiologically
    shown, spacing, edges = radiological_slice(lps, 1)
    assert shown[0, 0] == 1.0 and shown.shape == (4, 5)
    assert edges == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert spacing == (0.5, 0.5)
    ras = _image(values, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))  # i -> right, j -> anterior
    shown, _, edges = radiological_slice(ras, 1)
    assert shown[-1, -1] == 1.0  # (0, 0) is the patient's left-posterior voxel: bottom right
    assert edges == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    swapped = _image(values, direction=(0, 1, 0, 1, 0, 0, 0, 0, -1))  # i -> posterior
    shown, _, _ = radiological_slice(swapped, 1)
    assert shown.shape == (5, 4) and shown[0, 0] == 1.0  # transposed onto (y, x)
    anisotropic = sitk.Image(lps)
    anisotropic.SetSpacing((0.4, 0.8, 3.0))
    assert radiological_slice(anisotropic, 1)[1] == (0.8, 0.4)  # (row, column) mm


def test_coronal_slices_show_superior_up() -> None:
    values = np.zeros((3, 4, 5), np.float32)
    values[1, 0, 0] = 1.0
    # i -> patient left (x), j -> superior (z), k -> anterior (-y): a coronal stack
    coronal = _image(values, direction=(1, 0, 0, 0, 0, -1, 0, 1, 0))
    shown, _, edges = radiological_slice(coronal, 1)
    assert edges == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert shown[-1, 0] == 1.0  # j = 0 is the most inferior row: at the bottom
