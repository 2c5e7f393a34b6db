"""Output names: made in one place, in a fixed entity order, and read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.derivatives import (
    b_from_label,
    b_label,
    derivative_name,
    derivative_path,
    exam_prefix,
    parse_name,
)

EXAM = Path("/out/patients/P1a2b/S3c4d")
FROM_T2 = {"from": "T2w"}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"suffix": "dwi", "b": 800, "desc": "n4"}, "P1a2b_S3c4d_b800_desc-n4_dwi.nii.gz"),
        ({"suffix": "dwi", "b": 1000, "space": "T2w"}, "P1a2b_S3c4d_space-T2w_b1000_dwi.nii.gz"),
        (
            {"suffix": "adc", "desc": "fit", "space": "T2w"},
            "P1a2b_S3c4d_space-T2w_desc-fit_adc.nii.gz",
        ),
        ({"suffix": "dwi", "computed": 1400}, "P1a2b_S3c4d_computed-b1400_dwi.nii.gz"),
        (
            {"suffix": None, "extension": ".tfm", "b": 12.5, "to": "lowb"},
            "P1a2b_S3c4d_b12p5_to-lowb.tfm",
        ),
        (
            {"suffix": None, "extension": ".tfm", "to": "dwi", **FROM_T2},
            "P1a2b_S3c4d_from-T2w_to-dwi.tfm",
        ),
        (
            {"suffix": "mask", "extension": ".png", "model": "taps", "ref": "r1", "desc": "qc"},
            "P1a2b_S3c4d_model-taps_ref-r1_desc-qc_mask.png",
        ),
        (
            {"suffix": "dseg", "space": "T2w", "model": "demo"},
            "P1a2b_S3c4d_space-T2w_model-demo_dseg.nii.gz",
        ),
    ],
)
def test_names_follow_the_entity_order_and_read_back(kwargs: dict, name: str) -> None:
    path = derivative_path(EXAM, "dwi", **kwargs)
    assert path == EXAM / "dwi" / name
    parsed = parse_name(name, exam_prefix(EXAM))
    expected = {k: v for k, v in kwargs.items() if k not in ("suffix", "extension")}
    assert parsed.entities == {
        k: (float(v) if k in ("b", "computed") else v) for k, v in expected.items()
    }
    assert parsed.suffix == kwargs["suffix"]
    assert parsed.extension == kwargs.get("extension", ".nii.gz")


def test_b_labels_round_trip() -> None:
    assert [b_label(b) for b in (0, 50, 800.0, 12.5)] == ["0", "50", "800", "12p5"]
    assert b_from_label("12p5") == 12.5 and b_from_label("1400") == 1400.0
    with pytest.raises(ValueError):
        b_from_label("b800")


def test_unknown_entities_and_foreign_names_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown entities"):
        derivative_name("P_S", suffix="dwi", echo=1)
    with pytest.raises(ValueError, match="does not start"):
        parse_name("Other_S_dwi.nii.gz", "P_S")
    with pytest.raises(ValueError, match="unknown part"):
        parse_name("P_S_weird_dwi.nii.gz", "P_S")
