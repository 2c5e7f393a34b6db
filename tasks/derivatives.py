"""Output file names: the one place they are made and read back (BIDS-like entities).

One exam's outputs live under ``<output root>/patients/<patient>/<session>/`` in folders by
datatype (``anat``, ``dwi``, ``xfm``, ``seg``, ``figures``). A name is the exam prefix
``<patient>_<session>``, then the entities that apply in the fixed order of
:data:`ENTITY_ORDER` (``key-value``; the b-value as ``b<label>``), then the suffix and the
extension::

    <p>_<s>_b800_desc-n4_dwi.nii.gz          b = 800 s/mm², after N4
    <p>_<s>_space-T2w_desc-fit_adc.nii.gz    ADC (mm²/s) on the T2 grid
    <p>_<s>_b800_to-lowb.tfm                 motion of b800 onto the lowest b (ITK, LPS)
    <p>_<s>_space-T2w_model-taps_dseg.nii.gz label map of model ``taps``

b-values are written with ``p`` for a decimal point (12.5 -> ``12p5``); the same label is
used in artifact roles (``dwi_b800_n4``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

#: Entities in the order they appear in a name.
ENTITY_ORDER: tuple[str, ...] = ("space", "computed", "b", "from", "to", "model", "ref", "desc")
_B_LABEL = re.compile(r"^\d+(?:p\d+)?$")


def b_label(b: float) -> str:
    """A b-value (s/mm²) as a name label: 800 -> ``800``, 12.5 -> ``12p5``."""
    return f"{b:g}".replace(".", "p")


def b_from_label(label: str) -> float:
    """Inverse of :func:`b_label`: ``12p5`` -> 12.5 (ValueError for anything else)."""
    if not _B_LABEL.match(label):
        raise ValueError(f"not a b-value label: {label!r}")
    return float(label.replace("p", "."))


@dataclass(frozen=True)
class Name:
    """A parsed output name: entities (``b`` as s/mm²), suffix and extension."""

    prefix: str
    entities: dict[str, str | float] = field(default_factory=dict)
    suffix: str | None = None
    extension: str = ".nii.gz"


def exam_prefix(exam_dir: Path) -> str:
    """``<patient>_<session>`` of an exam folder ``.../<patient>/<session>``."""
    return f"{exam_dir.parent.name}_{exam_dir.name}"


def derivative_name(
    prefix: str,
    *,
    suffix: str | None,
    extension: str = ".nii.gz",
    **entities: str | float | None,
) -> str:
    """The file name for these entities (None values are left out)."""
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown entities {sorted(unknown)}; known: {ENTITY_ORDER}")
    parts = [prefix]
    for key in ENTITY_ORDER:
        value = entities.get(key)
        if value is None:
            continue
        if key == "b":
            parts.append(f"b{b_label(float(value))}")
        elif key == "computed":
            parts.append(f"computed-b{b_label(float(value))}")
        else:
            parts.append(f"{key}-{value}")
    if suffix:
        parts.append(suffix)
    return "_".join(parts) + extension


def derivative_path(
    exam_dir: Path,
    datatype: str,
    *,
    suffix: str | None,
    extension: str = ".nii.gz",
    **entities: str | float | None,
) -> Path:
    """``<exam_dir>/<datatype>/<name>`` (:func:`derivative_name` with the exam's prefix)."""
    name = derivative_name(exam_prefix(exam_dir), suffix=suffix, extension=extension, **entities)
    return exam_dir / datatype / name


def parse_name(name: str, prefix: str) -> Name:
    """Read a name made by :func:`derivative_name` with ``prefix`` back into its parts.

    Raises ValueError when ``name`` does not start with ``prefix`` or holds an unknown part.
    """
    extension = next(
        e for e in (".nii.gz", ".nii", ".tfm", ".json", ".csv", ".png", "") if (name.endswith(e))
    )
    stem = name[: len(name) - len(extension)] if extension else name
    if not stem.startswith(prefix):
        raise ValueError(f"{name!r} does not start with {prefix!r}")
    tokens = [t for t in stem[len(prefix) :].split("_") if t]
    entities: dict[str, str | float] = {}
    suffix = None
    for position, token in enumerate(tokens):
        key, dash, value = token.partition("-")
        if dash and key == "computed":
            entities["computed"] = b_from_label(value.removeprefix("b"))
        elif dash and key in ENTITY_ORDER:
            entities[key] = value
        elif token.startswith("b") and _B_LABEL.match(token[1:]):
            entities["b"] = b_from_label(token[1:])
        elif position == len(tokens) - 1:
            suffix = token
        else:
            raise ValueError(f"unknown part {token!r} in {name!r}")
    return Name(prefix=prefix, entities=entities, suffix=suffix, extension=extension)
