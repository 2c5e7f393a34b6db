"""File helpers shared by every step: content hashes and atomic, verified writes.

An interrupted run must never leave a half-written file that looks complete, so every
output is written to a temporary file in the destination folder, checked, and renamed into
place (``os.replace`` is atomic on POSIX file systems). The check matters on a full disk:
SimpleITK prints ``** ERROR: NWAD: wrote only 0 of N bytes`` and returns as if it had
written the image, so an empty or truncated file would otherwise be renamed into place and
recorded as a finished result. Bytes are written in full and ``fsync``-ed; images must read
back with the size and spacing written (and, gzip-compressed, as a complete gzip stream).
A failed write raises :class:`~tasks.errors.TransientError` naming the file and the cause
("no space left on device" when the file system is full) and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import SimpleITK as sitk

from tasks.errors import TransientError

_CHUNK = 1 << 20
_T = TypeVar("_T")

#: Free bytes below which a failed write is put down to a full file system.
NEAR_FULL_BYTES = 1 << 20
_FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


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


class _Incomplete(Exception):
    """The temporary file is not what the writer was asked to write (empty, truncated)."""


def _atomic(path: Path, write: Callable[[Path], None], verify: Callable[[Path], _T]) -> _T:
    """``write(tmp)`` to a temporary sibling of ``path``, ``verify(tmp)``, rename into place.

    Returns what ``verify`` returns. A failed write or check raises :class:`TransientError`
    (naming ``path`` and the cause) after the temporary file is removed.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Keep the full suffix (".nii.gz") so writers that choose a format by extension work.
        suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        result = verify(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        failure = _write_failure(path, error)  # before the unlink: the temp file holds space
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if failure is None:
            raise
        raise failure from error
    return result


def _free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system of ``folder`` (or its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _write_failure(path: Path, error: BaseException) -> TransientError | None:
    """The :class:`TransientError` for a failed write of ``path``; None: not a write failure
    (re-raise ``error`` as it is)."""
    if isinstance(error, _Incomplete):
        detail = str(error)
    elif isinstance(error, OSError):
        detail = error.strerror or str(error)
    elif isinstance(error, RuntimeError):  # SimpleITK: only when the disk is full (below)
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else ""
    else:
        return None
    folder = path.parent
    free = _free_bytes(folder)
    code = error.errno if isinstance(error, OSError) else None
    full = (
        code in _FULL_ERRNOS
        or "no space left on device" in str(error).lower()
        or (free is not None and free < NEAR_FULL_BYTES)
    )
    if not full and not isinstance(error, (_Incomplete, OSError)):
        return None
    if full:
        cause = _FULL_ERRNOS.get(code or 0, "no space left on device")
        if free is not None:
            cause += f" ({free} bytes free in {folder})"
        if detail and detail.lower().removeprefix("reason: ") not in cause:
            cause += f"; {detail}"
        hint = f"free space in {folder}, then run again; nothing was left under the file's name"
    else:
        cause = detail or type(error).__name__
        hint = "check the output folder and its file system, then run again"
    return TransientError(f"could not write {path.name}: {cause}", path=path, hint=hint)


def _write_all(tmp: Path, data: bytes) -> None:
    """Write every byte of ``data`` to ``tmp`` and fsync it (short writes raise)."""
    with open(tmp, "wb", buffering=0) as handle:
        view = memoryview(data)
        while view:
            written = handle.write(view)
            if not written:
                raise _Incomplete(f"wrote only {len(data) - len(view)} of {len(data)} bytes")
            view = view[written:]
        os.fsync(handle.fileno())


def _fsync(path: Path) -> None:
    """Flush ``path``'s data to disk; a deferred write error (ENOSPC on NFS...) raises here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> str:
    """Write ``data`` atomically; return its sha256.

    Raises
    ------
    TransientError
        If the bytes could not all be written (e.g. no space left on device).
    """

    def verify(tmp: Path) -> str:
        size = tmp.stat().st_size
        if size != len(data):
            raise _Incomplete(f"the file has {size} of {len(data)} bytes")
        return hashlib.sha256(data).hexdigest()

    return _atomic(Path(path), lambda tmp: _write_all(tmp, data), verify)


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

    Raises
    ------
    TransientError
        If the file written is empty, does not read back with the image's size and spacing,
        or is truncated (SimpleITK does not raise on a full disk).
    """

    def write(tmp: Path) -> None:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        _fsync(tmp)

    return _atomic(Path(path), write, lambda tmp: _verify_image(image, tmp))


def _verify_image(image: sitk.Image, tmp: Path) -> str:
    """Check the written ``tmp`` against ``image``; return its sha256."""
    size = tmp.stat().st_size
    if size == 0:
        raise _Incomplete("the image file is empty (0 bytes)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise _Incomplete(f"the image header does not read back ({last})") from None
    same = reader.GetSize() == image.GetSize() and all(
        math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
        for a, b in zip(reader.GetSpacing(), image.GetSpacing(), strict=True)
    )
    if not same:
        raise _Incomplete(
            f"the image reads back as size {reader.GetSize()}, spacing {reader.GetSpacing()}; "
            f"written: size {image.GetSize()}, spacing {image.GetSpacing()}"
        )
    payload = _pixel_bytes(image)
    with open(tmp, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    if gzipped:
        digest, raw = _gzip_sha256(tmp)
    elif tmp.name.endswith(".nii"):
        digest, raw = sha256_file(tmp), size
    else:  # another format (MetaImage, NRRD, ...): its reader fails on missing pixel data
        try:
            sitk.ReadImage(str(tmp))
        except RuntimeError as error:
            raise _Incomplete(f"the image does not read back ({error})") from None
        digest, raw = sha256_file(tmp), payload
    if raw < payload:
        raise _Incomplete(f"the image file holds {raw} bytes of {payload} bytes of pixel data")
    return digest


def _pixel_bytes(image: sitk.Image) -> int:
    """Bytes of ``image``'s pixel data (0 where numpy cannot view the pixel type)."""
    try:
        return sitk.GetArrayViewFromImage(image).nbytes
    except (RuntimeError, TypeError, ValueError):
        return 0


def _gzip_sha256(path: Path) -> tuple[str, int]:
    """sha256 of a gzip file's bytes and its uncompressed size; raises :class:`_Incomplete`
    unless the gzip stream is complete and its checksum matches."""
    digest = hashlib.sha256()
    inflater = zlib.decompressobj(wbits=31)
    total = 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                data = chunk
                while not inflater.eof:  # bounded output per call: memory stays small
                    out = inflater.decompress(data, _CHUNK)
                    data = inflater.unconsumed_tail
                    total += len(out)
                    if not out and not data:
                        break
    except zlib.error as error:
        raise _Incomplete(f"the gzip stream is corrupt ({error})") from None
    if not inflater.eof:
        raise _Incomplete(f"the gzip stream ends early after {total} bytes (truncated)")
    return digest.hexdigest(), total
