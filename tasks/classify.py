"""Classify the DICOM series of one exam from their metadata and choose the ones to use.

Classification (:func:`classify_series`), first rule that applies:

1. *other*: not MR, multi-frame without per-frame functional groups, Siemens mosaic, no
   image geometry, mixed orientations within the series, or a localizer (ImageType
   LOCALIZER, description localizer/scout/survey). Enhanced multi-frame DICOM is read frame
   by frame (:mod:`tasks.dicom_enhanced`): each frame is one image, like a classic file.
2. *other*: exponential ADC or FA maps (ImageType EADC / EXP / FA).
3. *adc*: ImageType contains ADC, or the description names ADC / dADC / apparent diffusion.
   A b-value tag on an ADC series (Siemens stores the highest fitted b there) is ignored.
4. *computed_dwi*: ImageType or description CALC_BVAL / CALCBVAL / "calculated b", or a
   single-b series whose SequenceName names an acquired range (``ep_b50_800``) and whose b
   lies above it. It must hold exactly one b-value.
5. *dwi*: ImageType DIFFUSION / TRACEW or a b-value in any image; every image needs a
   b-value (s/mm²; below 1 s/mm² counts as b0). Per b-value the scanner's trace (isotropic)
   images are used and directional images of that b ignored; where a b-value has only
   directional images, its trace is the geometric mean of the directions
   (:mod:`tasks.dwi_trace`; at least 3 directions, each with its gradient direction). The
   reason says how each b-volume is made (``b1000: geometric mean of 6 directions``).
6. *t2w*: spin echo (ScanningSequence SE, not EP / IR) with EchoTime >= 60 ms; without an
   echo time, a TSE/FSE SequenceName. Anything else is *other* (gradient echo, PD, T1).

ADC, computed, DWI and T2W must be axial (slice normal within 30 degrees of the z axis);
non-axial ones become *other* (sagittal / coronal distractors).

Selection (:func:`select_series`), every rule deterministic:

* T2W: ORIGINAL before DERIVED, then most slice positions, then finest in-plane pixel
  area, then lowest series number, then folder name.
* DWI: the primary series has the most distinct b-values, then most slices, then lowest
  series number. Another DWI series is merged into it only when it is on the primary's grid
  (same orientation, matrix, pixel spacing and in-plane origin) *and* of the same
  acquisition (echo and repetition time within ``ACQUISITION_TOL_MS``; a time missing on
  one side only counts as different). A b-value present more than once within that
  acquisition is averaged. DWI series on another grid, or of another acquisition (e.g. a
  separate high-b series with a longer TE), are rejected: one fit must not mix echo times,
  because S0 differs between them. On ProstateX-0218, merging the TE 72 ms b100/500/1400
  series into the TE 60 ms b0-800 series put the ADC 13.9 % (wlls) to 30.4 % (ols) below
  the scanner's map of the primary series in the central box (-4.2 % / -15.7 % in the TAPS
  gland), against +0.5 % / -3.3 % for the primary series alone
  (``benchmarks/results/adc_scanner.md``).
* ADC: on the primary DWI grid, then of the same acquisition as the primary DWI (echo and
  repetition time as above), then most slices, then lowest series number, then folder.
* Computed high b: one per b-value, with the same ordering as ADC.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tasks.dicom_headers import DicomHeader, slice_normal
from tasks.dwi_trace import TraceProblem, plan_b_volumes

Kind = Literal["t2w", "dwi", "adc", "computed_dwi", "other"]

AXIAL_MAX_DEGREES = 30.0
T2_MIN_ECHO_MS = 60.0
ORIENTATION_TOL = 1e-3
POSITION_TOL_MM = 0.05
ACQUISITION_TOL_MS = 0.5  # echo / repetition times closer than this count as equal

_LOCALIZER = re.compile(r"locali[sz]er|scout|survey|3[- ]?plane", re.IGNORECASE)
_ADC = re.compile(r"(?<![a-z])d?adc(?![a-z])|apparent[ _-]?diffusion", re.IGNORECASE)
_CALC = re.compile(r"calc_?bval|calculated[ _-]?b|computed[ _-]?b", re.IGNORECASE)
_TSE = re.compile(r"tse|fse|haste|h2d|space|blade", re.IGNORECASE)


@dataclass(frozen=True)
class SeriesClass:
    """What a series is, with the evidence (``reason``) and its distinct b-values."""

    folder: str
    kind: Kind
    reason: str
    b_values: tuple[float, ...]
    series_number: int | None


@dataclass(frozen=True)
class Decision:
    """Whether a series is used (and as what), and why."""

    folder: str
    kind: Kind
    selected: bool
    reason: str


@dataclass(frozen=True)
class Selection:
    """The series chosen for each role (folders; primary DWI first) and every decision."""

    t2w: str | None
    dwi: tuple[str, ...]
    adc: str | None
    computed: tuple[str, ...]
    decisions: tuple[Decision, ...]


def _b_list(values: Sequence[float]) -> str:
    return ", ".join(f"{b:g}" for b in values)


def _count(headers: Sequence[DicomHeader]) -> str:
    """``57 files``, or ``21 files, 819 frames`` for enhanced multi-frame DICOM."""
    files = len({h.path for h in headers})
    frames = sum(h.frame is not None for h in headers)
    return f"{files} files, {frames} frames" if frames else f"{files} files"


def plane(headers: Sequence[DicomHeader]) -> tuple[str, float]:
    """Return (``axial``/``coronal``/``sagittal``, angle in degrees of the normal to z)."""
    normal = slice_normal(headers[0].orientation)  # type: ignore[arg-type]
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    name = ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]
    return name, angle


def slice_positions(headers: Sequence[DicomHeader]) -> list[float]:
    """Distinct slice positions (mm) along the slice normal, ascending."""
    normal = slice_normal(headers[0].orientation)  # type: ignore[arg-type]
    values = sorted(float(np.dot(h.position, normal)) for h in headers)  # type: ignore[arg-type]
    distinct: list[float] = []
    for value in values:
        if not distinct or value - distinct[-1] > POSITION_TOL_MM:
            distinct.append(value)
    return distinct


def _geometry_problem(headers: Sequence[DicomHeader]) -> str | None:
    if any(h.modality not in ("MR", "") for h in headers):
        return f"modality {headers[0].modality}, not MR"
    if any(h.number_of_frames > 1 and h.frame is None for h in headers):
        return "multi-frame DICOM without per-frame functional groups is not supported"
    if any("MOSAIC" in h.image_type for h in headers):
        return "Siemens mosaic (several slices tiled in one image) is not supported"
    if any(h.orientation is None or h.position is None or not h.pixel_spacing for h in headers):
        return "no image geometry (ImageOrientationPatient/ImagePositionPatient/PixelSpacing)"
    first = np.asarray(headers[0].orientation)
    worst = max(float(np.max(np.abs(np.asarray(h.orientation) - first))) for h in headers)
    if worst > ORIENTATION_TOL:
        return f"mixed orientations within the series (cosines differ by up to {worst:.3f})"
    return None


def _b_values(headers: Sequence[DicomHeader]) -> tuple[float, ...]:
    return tuple(sorted({round(h.b_value, 1) for h in headers if h.b_value is not None}))


def _axial(kind: Kind, headers: Sequence[DicomHeader], what: str) -> tuple[Kind, str]:
    name, angle = plane(headers)
    if angle > AXIAL_MAX_DEGREES:
        return "other", f"{what} but {name} (slice normal {angle:.0f} deg from z): not used"
    return kind, f"{what}; axial (slice normal {angle:.0f} deg from z)"


def classify_series(folder: str, headers: Sequence[DicomHeader]) -> SeriesClass:
    """Classify one series from its headers (see the module docstring for the rules)."""
    kind, reason = _classify(headers)
    number = headers[0].series_number if headers else None
    return SeriesClass(folder, kind, reason, _b_values(headers), number)


def _classify(headers: Sequence[DicomHeader]) -> tuple[Kind, str]:
    if not headers:
        return "other", "no readable DICOM images"
    problem = _geometry_problem(headers)
    if problem:
        return "other", problem
    first = headers[0]
    image_type = {t for h in headers for t in h.image_type}
    description = first.series_description
    if "LOCALIZER" in image_type or _LOCALIZER.search(description):
        return "other", "localizer / scout"
    if image_type & {"EADC", "EXP", "FA"}:
        return "other", f"derived diffusion map {sorted(image_type & {'EADC', 'EXP', 'FA'})}"
    b_values = _b_values(headers)
    if "ADC" in image_type or _ADC.search(description):
        evidence = "ImageType ADC" if "ADC" in image_type else "description names ADC"
        if b_values:
            evidence += f" (its b tag {_b_list(b_values)} does not make it a DWI)"
        return _axial("adc", headers, f"scanner ADC: {evidence}")
    seq_range = first.sequence_b_range
    calc = image_type & {"CALC_BVAL", "CALCBVAL"} or _CALC.search(description)
    above = seq_range and len(b_values) == 1 and b_values[0] > seq_range[1]
    if calc or above:
        if len(b_values) != 1:
            return "other", f"computed diffusion image with {len(b_values)} b-values, need one"
        evidence = (
            "ImageType/description CALC_BVAL"
            if calc
            else f"b{b_values[0]:g} above the acquired range b{seq_range[0]}-{seq_range[1]}"  # type: ignore[index]
        )
        return _axial("computed_dwi", headers, f"scanner-computed b{b_values[0]:g}: {evidence}")
    if image_type & {"DIFFUSION", "TRACEW"} or b_values:
        missing = sum(h.b_value is None for h in headers)
        if missing:
            return "other", f"diffusion series but {missing} image(s) carry no b-value"
        try:
            plans = plan_b_volumes(headers)
        except TraceProblem as exc:
            return "other", f"diffusion series, but {exc}"
        sources = sorted({h.b_value_source for h in headers if h.b_value_source})
        notes = "; ".join(plan.note for plan in plans)
        what = (
            f"DWI b = {_b_list(b_values)} (b from {'/'.join(sources)}; {_count(headers)}); {notes}"
        )
        return _axial("dwi", headers, what)
    sequences = set(first.scanning_sequence)
    if "SE" in sequences and not sequences & {"EP", "IR"}:
        te = first.echo_time
        if te is not None and te >= T2_MIN_ECHO_MS:
            return _axial("t2w", headers, f"T2W: spin echo, TE {te:g} ms")
        if te is None and _TSE.search(first.sequence_name):
            return _axial("t2w", headers, "T2W: turbo spin echo sequence name (no TE)")
        if te is None:
            return "other", "spin echo without echo time or TSE sequence name: not T2W"
        return "other", f"spin echo with TE {te:g} ms (PD/T1-weighted), not T2W"
    return "other", f"not T2W or diffusion (ScanningSequence {'/'.join(sorted(sequences))})"


def _grid_key(headers: Sequence[DicomHeader]) -> tuple:
    first = headers[0]
    return (first.rows, first.columns, first.pixel_spacing)


def same_grid(a: Sequence[DicomHeader], b: Sequence[DicomHeader]) -> bool:
    """Same orientation, matrix, pixel spacing and in-plane origin (slices may differ)."""
    if _grid_key(a) != _grid_key(b):
        return False
    oa, ob = np.asarray(a[0].orientation), np.asarray(b[0].orientation)
    if float(np.max(np.abs(oa - ob))) > ORIENTATION_TOL:
        return False
    offset = np.asarray(b[0].position) - np.asarray(a[0].position)
    in_plane = offset - np.dot(offset, slice_normal(a[0].orientation)) * slice_normal(
        a[0].orientation  # type: ignore[arg-type]
    )
    return float(np.linalg.norm(in_plane)) <= 0.1 * min(a[0].pixel_spacing)  # type: ignore[arg-type]


def _number(value: int | None) -> float:
    return float(value) if value is not None else math.inf


def _same_time(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) <= ACQUISITION_TOL_MS


def _same_acquisition(a: Sequence[DicomHeader], b: Sequence[DicomHeader]) -> bool:
    """Same echo and repetition time (within ``ACQUISITION_TOL_MS``; both missing = same)."""
    return _same_time(a[0].echo_time, b[0].echo_time) and _same_time(
        a[0].repetition_time, b[0].repetition_time
    )


def _te_tr(headers: Sequence[DicomHeader]) -> str:
    def text(value: float | None) -> str:
        return "?" if value is None else f"{value:g}"

    h = headers[0]
    return f"TE {text(h.echo_time)} ms, TR {text(h.repetition_time)} ms"


def select_series(series: Mapping[str, Sequence[DicomHeader]]) -> Selection:
    """Classify every series (folder -> headers) and choose one per role, with reasons.

    Returns a :class:`Selection` with one :class:`Decision` per series, in folder order.
    A role without any candidate is ``None`` / empty; deciding whether that is an error is
    the caller's job.
    """
    classes = {folder: classify_series(folder, hs) for folder, hs in sorted(series.items())}
    by_kind: dict[str, list[str]] = {}
    for folder, cls in classes.items():
        by_kind.setdefault(cls.kind, []).append(folder)
    decisions: dict[str, Decision] = {}

    def decide(folder: str, selected: bool, why: str) -> None:
        cls = classes[folder]
        decisions[folder] = Decision(folder, cls.kind, selected, f"{cls.reason}; {why}")

    def n_slices(folder: str) -> int:
        return len(slice_positions(series[folder]))

    t2w = None
    candidates = by_kind.get("t2w", [])
    if candidates:

        def t2_key(folder: str) -> tuple:
            h = series[folder][0]
            derived = "DERIVED" in h.image_type
            area = h.pixel_spacing[0] * h.pixel_spacing[1]  # type: ignore[index]
            return (derived, -n_slices(folder), area, _number(h.series_number), folder)

        ranked = sorted(candidates, key=t2_key)
        t2w = ranked[0]
        rule = "ORIGINAL, most slices, finest pixels, lowest series number"
        decide(t2w, True, f"selected as T2W ({len(ranked)} candidate(s); rule: {rule})")
        for other in ranked[1:]:
            decide(other, False, f"another axial T2W ranks higher ({rule}): {t2w}")

    dwi: list[str] = []
    candidates = by_kind.get("dwi", [])
    primary = None
    if candidates:

        def dwi_key(folder: str) -> tuple:
            n_b = len(classes[folder].b_values)
            return (-n_b, -n_slices(folder), _number(series[folder][0].series_number), folder)

        ranked = sorted(candidates, key=dwi_key)
        primary = ranked[0]
        dwi.append(primary)
        seen: dict[float, list[str]] = {b: [primary] for b in classes[primary].b_values}
        for other in ranked[1:]:
            if not same_grid(series[primary], series[other]):
                decide(other, False, f"not on the grid of the primary DWI series {primary}")
                continue
            if not _same_acquisition(series[primary], series[other]):
                decide(
                    other,
                    False,
                    f"another acquisition ({_te_tr(series[other])} vs primary {primary} "
                    f"{_te_tr(series[primary])}): not mixed into the primary's fit",
                )
                continue
            dwi.append(other)
            for b in classes[other].b_values:
                seen.setdefault(b, []).append(other)
        repeated = {b: f for b, f in seen.items() if len(f) > 1}
        for folder in dwi:
            notes = [
                f"b{b:g} also in {', '.join(x for x in f if x != folder)}: averaged"
                for b, f in sorted(repeated.items())
                if folder in f
            ]
            if folder == primary:
                why = "selected as primary DWI (most b-values, most slices, lowest number)"
            else:
                why = (
                    f"merged with primary DWI {primary} (same grid, same acquisition: "
                    f"{_te_tr(series[folder])})"
                )
            decide(folder, True, "; ".join([why, *notes]))

    def pick(kind: str, label: str) -> list[str]:
        def key(folder: str) -> tuple:
            hs = series[folder]
            on_grid = primary is not None and same_grid(series[primary], hs)
            same = primary is not None and _same_acquisition(series[primary], hs)
            number = _number(hs[0].series_number)
            return (not on_grid, not same, -n_slices(folder), number, folder)

        if primary is None:
            ranked = sorted(by_kind.get(kind, []), key=key)
        else:
            ranked = []
            for folder in sorted(by_kind.get(kind, []), key=key):
                if same_grid(series[primary], series[folder]):
                    ranked.append(folder)
                else:
                    decide(folder, False, f"not on the grid of the primary DWI series {primary}")
        chosen: dict[float, str] = {}
        rule = "on DWI grid, same TE/TR as primary DWI, most slices, lowest number"
        for folder in ranked:
            b = classes[folder].b_values[0] if kind == "computed_dwi" else 0.0
            if b in chosen:
                decide(folder, False, f"another {label} ranks higher ({rule}): {chosen[b]}")
                continue
            chosen[b] = folder
            decide(folder, True, f"selected as {label} (rule: {rule})")
        return list(chosen.values())

    adc = pick("adc", "scanner ADC")
    computed = pick("computed_dwi", "computed high b")
    for folder in by_kind.get("other", []):
        decide(folder, False, "ignored")
    ordered = tuple(decisions[f] for f in sorted(decisions))
    return Selection(t2w, tuple(dwi), adc[0] if adc else None, tuple(computed), ordered)
