"""Series classification and selection from metadata, on headers built in the test."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from tasks.classify import classify_series, same_grid, select_series
from tasks.dicom_headers import DicomHeader, header_from_dataset

AXIAL = (1.0, 0.0, 0.0, 0.0, 0.948, -0.317)  # 18.5 degrees oblique, like ProstateX
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, -0.317, -0.948)
T2 = {"ImageType": ["ORIGINAL", "PRIMARY", "M"], "ScanningSequence": "SE", "EchoTime": 104}
TRACE = ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"]
EPI = {"ImageType": TRACE, "ScanningSequence": "EP", "EchoTime": 63, "RepetitionTime": 2700}


def make_series(
    n: int = 19,
    *,
    iop: tuple[float, ...] = AXIAL,
    b_values: tuple[float | None, ...] = (None,),
    description: str = "",
    number: int = 4,
    spacing: tuple[float, float] = (0.5, 0.5),
    matrix: tuple[int, int] = (384, 384),
    step: float = 3.0,
    origin: tuple[float, float, float] = (-50.0, -80.0, -20.0),
    siemens_b: bool = False,
    **attributes: object,
) -> list[DicomHeader]:
    """Headers of one series: ``n`` slices for each b-value in ``b_values`` (interleaved)."""
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col) / np.linalg.norm(np.cross(row, col))
    headers = []
    for i, b in enumerate(b_values):
        for k in range(n):
            ds = Dataset()
            ds.Modality, ds.Manufacturer = "MR", "SIEMENS"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", f"1.2.3.{number}"
            ds.SeriesNumber, ds.SeriesDescription = number, description
            ds.InstanceNumber = i * n + k + 1
            ds.Rows, ds.Columns = matrix
            ds.BitsAllocated = 16
            ds.PixelSpacing = list(spacing)
            ds.SliceThickness = step
            ds.ImageOrientationPatient = list(iop)
            ds.ImagePositionPatient = list(np.asarray(origin) + k * step * normal)
            if b is not None and siemens_b:
                ds.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
                ds.add_new((0x0019, 0x100C), "OB", f"{b:g} ".encode())
            elif b is not None:
                ds.DiffusionBValue = b
            for key, value in attributes.items():
                setattr(ds, key, value)
            headers.append(header_from_dataset(ds, Path(f"s{number}/{i * n + k + 1}.dcm")))
    return headers


def test_axial_t2_and_orientation_distractors() -> None:
    exam = {
        "ex/3 sag": make_series(iop=SAGITTAL, number=3, **T2),
        "ex/4 tra": make_series(number=4, **T2),
        "ex/5 cor": make_series(iop=CORONAL, number=5, **T2),
    }
    selection = select_series(exam)
    assert selection.t2w == "ex/4 tra"
    reasons = {d.folder: d for d in selection.decisions}
    assert reasons["ex/4 tra"].selected and "axial" in reasons["ex/4 tra"].reason
    assert not reasons["ex/3 sag"].selected and "sagittal" in reasons["ex/3 sag"].reason
    assert not reasons["ex/5 cor"].selected and "coronal" in reasons["ex/5 cor"].reason


def test_pd_gradient_echo_and_localizer_are_rejected() -> None:
    pd = make_series(number=9, ImageType=["ORIGINAL"], ScanningSequence="SE", EchoTime=15)
    gre = make_series(number=10, ImageType=["ORIGINAL"], ScanningSequence="GR", EchoTime=1.5)
    localizer = make_series(3, number=1, **T2) + make_series(3, iop=SAGITTAL, number=1, **T2)
    named = make_series(number=2, description="t2_localizer", **T2)
    assert classify_series("pd", pd).kind == "other"
    assert "PD/T1" in classify_series("pd", pd).reason
    assert "GR" in classify_series("gre", gre).reason
    assert "mixed orientations" in classify_series("loc", localizer).reason
    assert classify_series("named", named).reason == "localizer / scout"


@pytest.mark.parametrize(
    ("a", "b", "winner", "rule"),
    [
        ({"n": 19}, {"n": 20}, "b", "more slices"),
        ({"spacing": (0.6, 0.6)}, {"spacing": (0.5, 0.5)}, "b", "finer pixels"),
        ({"number": 7}, {"number": 5}, "b", "lower series number"),
        ({"number": 5}, {"number": 7}, "a", "lower series number"),
    ],
)
def test_several_axial_t2_are_ranked_deterministically(
    a: dict, b: dict, winner: str, rule: str
) -> None:
    a.setdefault("number", 4)
    b.setdefault("number", 6)
    exam = {"ex/a": make_series(**a, **T2), "ex/b": make_series(**b, **T2)}
    for order in (list(exam.items()), list(reversed(exam.items()))):
        selection = select_series(dict(order))
        assert selection.t2w == f"ex/{winner}", rule
        loser = "ex/b" if winner == "a" else "ex/a"
        rejected = next(d for d in selection.decisions if d.folder == loser)
        assert not rejected.selected and "ranks higher" in rejected.reason


def test_interleaved_dwi_adc_and_computed_high_b() -> None:
    dwi = make_series(
        number=6, b_values=(50, 400, 800), siemens_b=True, SequenceName="*ep_b50t", **EPI
    )
    adc_type = ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
    adc = make_series(
        number=7,
        b_values=(800,),
        siemens_b=True,
        SequenceName="*ep_b50_800",
        **{**EPI, "ImageType": adc_type},
    )
    calc = make_series(
        number=8,
        b_values=(1000,),
        siemens_b=True,
        SequenceName="*ep_b50_800",
        description="ep2d_diff_tra_DYNDISTCALC_BVAL",
        **EPI,
    )
    assert classify_series("dwi", dwi).b_values == (50.0, 400.0, 800.0)
    adc_class = classify_series("adc", adc)
    assert adc_class.kind == "adc" and "does not make it a DWI" in adc_class.reason
    assert classify_series("calc", calc).kind == "computed_dwi"
    selection = select_series({"ex/6": dwi, "ex/7": adc, "ex/8": calc})
    assert (selection.dwi, selection.adc, selection.computed) == (("ex/6",), "ex/7", ("ex/8",))


def test_computed_high_b_recognised_from_sequence_range_alone() -> None:
    calc = make_series(number=8, b_values=(1400,), SequenceName="ep_b0_800", **EPI)
    result = classify_series("calc", calc)
    assert result.kind == "computed_dwi" and "above the acquired range" in result.reason


def test_adc_from_description_only() -> None:
    adc = make_series(
        number=7,
        description="Apparent Diffusion Coefficient (mm2/s)",
        ImageType=["DERIVED", "SECONDARY"],
        ScanningSequence="EP",
    )
    assert classify_series("adc", adc).kind == "adc"
    dadc = make_series(number=7, description="dADC_b50_800", ImageType=["DERIVED"])
    assert classify_series("dadc", dadc).kind == "adc"


def test_dwi_without_b_value_in_every_file_is_rejected() -> None:
    files = make_series(number=6, b_values=(0, 800), **EPI) + make_series(number=6, **EPI)
    result = classify_series("dwi", files)
    assert result.kind == "other" and "carry no b-value" in result.reason


def test_directional_diffusion_without_gradient_directions_is_rejected() -> None:
    """Directional images are usable only through their directions (geometric mean)."""
    epi = {**EPI, "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]}
    files = make_series(number=6, b_values=(1000,), DiffusionDirectionality="DIRECTIONAL", **epi)
    result = classify_series("dwi", files)
    assert result.kind == "other"
    assert "directional" in result.reason and "without a gradient direction" in result.reason


def test_non_axial_dwi_is_rejected() -> None:
    files = make_series(number=6, iop=CORONAL, b_values=(0, 800), **EPI)
    result = classify_series("dwi", files)
    assert result.kind == "other" and "coronal" in result.reason


def test_dwi_one_acquisition_per_fit_and_grid_rule() -> None:
    """Like ProstateX-0218: b0-800 at TE 60 ms plus separate single-b series at TE 72 ms."""
    grid = {"spacing": (2.0, 2.0), "matrix": (128, 84)}
    multi = make_series(number=8, b_values=(0, 100, 400, 800), **grid, **EPI)
    other_te = {**EPI, "EchoTime": 72, "RepetitionTime": 3600}
    single_100 = make_series(number=17, b_values=(100,), **grid, **other_te)
    single_1400 = make_series(number=19, b_values=(1400,), **grid, **other_te)
    other_grid = make_series(
        number=20, b_values=(2000,), spacing=(1.0, 1.0), matrix=(256, 168), **EPI
    )
    selection = select_series(
        {"ex/17": single_100, "ex/19": single_1400, "ex/8": multi, "ex/20": other_grid}
    )
    assert selection.dwi == ("ex/8",)
    by_folder = {d.folder: d for d in selection.decisions}
    assert by_folder["ex/8"].selected and "primary" in by_folder["ex/8"].reason
    assert "averaged" not in by_folder["ex/8"].reason
    for folder in ("ex/17", "ex/19"):
        decision = by_folder[folder]
        assert not decision.selected
        assert (
            "another acquisition (TE 72 ms, TR 3600 ms vs primary ex/8 TE 63 ms, TR 2700 ms): "
            "not mixed into the primary's fit"
        ) in decision.reason
    assert not by_folder["ex/20"].selected and "not on the grid" in by_folder["ex/20"].reason


def test_repeated_b_value_within_one_acquisition_is_averaged() -> None:
    grid = {"spacing": (2.0, 2.0), "matrix": (128, 84)}
    multi = make_series(number=8, b_values=(0, 100, 400, 800), **grid, **EPI)
    # the same acquisition, times as rounded by another software version (within 0.5 ms)
    repeat = make_series(
        number=9,
        b_values=(100, 1400),
        **grid,
        **{**EPI, "EchoTime": 63.2, "RepetitionTime": 2700.4},
    )
    selection = select_series({"ex/9": repeat, "ex/8": multi})
    assert selection.dwi == ("ex/8", "ex/9")
    by_folder = {d.folder: d for d in selection.decisions}
    assert "b100 also in ex/9: averaged" in by_folder["ex/8"].reason
    assert "b100 also in ex/8: averaged" in by_folder["ex/9"].reason
    assert "merged with primary DWI ex/8 (same grid, same acquisition" in by_folder["ex/9"].reason


@pytest.mark.parametrize(
    ("primary", "other", "merged"),
    [
        ({}, {"EchoTime": 63.6}, False),  # beyond the 0.5 ms tolerance
        ({}, {"RepetitionTime": 2701.0}, False),
        ({}, {"EchoTime": None}, False),  # missing on one side only: not the same
        ({"EchoTime": None}, {}, False),
        (
            {"EchoTime": None, "RepetitionTime": None},
            {"EchoTime": None, "RepetitionTime": None},
            True,
        ),
    ],
)
def test_same_acquisition_tolerance_and_missing_times(
    primary: dict, other: dict, merged: bool
) -> None:
    grid = {"spacing": (2.0, 2.0), "matrix": (128, 84)}

    def series(number: int, b_values: tuple[float, ...], changes: dict) -> list:
        attributes = {k: v for k, v in {**EPI, **changes}.items() if v is not None}
        return make_series(number=number, b_values=b_values, **grid, **attributes)

    exam = {"ex/8": series(8, (0, 400, 800), primary), "ex/9": series(9, (1400,), other)}
    selection = select_series(exam)
    assert selection.dwi == (("ex/8", "ex/9") if merged else ("ex/8",))
    decision = next(d for d in selection.decisions if d.folder == "ex/9")
    assert decision.selected == merged
    if not merged:
        assert "another acquisition" in decision.reason and "TE " in decision.reason


def test_adc_preference_same_acquisition_as_primary_dwi() -> None:
    grid = {"spacing": (2.0, 2.0), "matrix": (128, 84)}
    adc_type = {"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]}
    dwi = make_series(number=8, b_values=(0, 800), **grid, **EPI)
    adc_other = make_series(number=5, **grid, **{**EPI, **adc_type, "EchoTime": 72})
    adc_same = make_series(number=9, **grid, **{**EPI, **adc_type})
    selection = select_series({"ex/5": adc_other, "ex/8": dwi, "ex/9": adc_same})
    assert selection.adc == "ex/9"
    rejected = next(d for d in selection.decisions if d.folder == "ex/5")
    assert not rejected.selected and "ex/9" in rejected.reason


def test_every_series_gets_one_decision_with_a_reason() -> None:
    exam = {
        f"ex/{i}": make_series(number=i, iop=random.Random(i).choice([AXIAL, SAGITTAL]), **T2)
        for i in range(1, 6)
    }
    selection = select_series(exam)
    assert sorted(d.folder for d in selection.decisions) == sorted(exam)
    assert all(d.reason for d in selection.decisions)
    assert sum(d.selected for d in selection.decisions) == 1


def test_same_grid_ignores_slice_count_but_not_in_plane_origin() -> None:
    a = make_series(10, **T2)
    assert same_grid(a, make_series(12, **T2))
    assert not same_grid(a, make_series(10, origin=(-40.0, -80.0, -20.0), **T2))
