"""File helpers shared by every step: content hashes and atomic writes.

An interrupted run must never leave a half-written file that looks complete, so every
output is written to a temporary file in the destination folder and renamed into place
(``os.replace`` is atomic on POSIX file systems).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import SimpleITK as sitk

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """Return one digest over several files: sha256 of their sorted (name, digest) pairs."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the full suffix (e.g. ".nii.gz") so writers that choose a format by extension work.
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> str:
    """Write ``data`` atomically; return its sha256."""
    _atomic(Path(path), lambda tmp: tmp.write_bytes(data))
    return hashlib.sha256(data).hexdigest()


def write_text_atomic(path: str | Path, text: str) -> str:
    """Write UTF-8 ``text`` atomically; return its sha256."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> str:
    """Write ``obj`` as indented, key-sorted JSON atomically; return its sha256."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_image_atomic(image: sitk.Image, path: str | Path, *, compress: bool = True) -> str:
    """Write a SimpleITK image atomically (format from the suffix); return the file's sha256.

    The geometry (origin, spacing, direction) is written as the image carries it, in LPS
    physical coordinates (mm); NIfTI writers convert to RAS on disk and back on reading.
    """
    path = Path(path)
    _atomic(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=compress))
    return sha256_file(path)
