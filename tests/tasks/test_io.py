"""tasks.io: writes are verified before the rename. A full disk (SimpleITK prints
"NWAD: wrote only 0 of N bytes" and returns) raises TransientError naming the file and
"no space left on device", leaves nothing under the final name, and is not cached; once
space is freed the rerun completes."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from sqlmodel import Session, select

import tasks.io as io
from db.models import StepRun
from db.store import upgrade
from flows.steps import FileRef, RunContext, engine_for, execute_step
from tasks.errors import TransientError
from tasks.io import sha256_file, write_bytes_atomic, write_image_atomic, write_json_atomic

_Usage = namedtuple("_Usage", "total used free")


def _image(shape=(6, 40, 40), seed: int = 0) -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(seed).random(shape, np.float32))
    image.SetSpacing((0.5, 0.5, 3.0))
    return image


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io.shutil, "disk_usage", lambda _p: _Usage(10**9, 10**9, 0))


def _left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_round_trip_with_their_sha256(tmp_path: Path) -> None:
    image = _image()
    sha = write_image_atomic(image, tmp_path / "a" / "t2.nii.gz")
    assert sha == sha256_file(tmp_path / "a" / "t2.nii.gz")
    back = sitk.ReadImage(str(tmp_path / "a" / "t2.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    for name in ("t2.nii", "t2.mha"):
        assert write_image_atomic(image, tmp_path / name) == sha256_file(tmp_path / name)
    assert write_json_atomic(tmp_path / "x.json", {"a": 1}) == sha256_file(tmp_path / "x.json")
    assert write_bytes_atomic(tmp_path / "empty", b"") == sha256_file(tmp_path / "empty")
    assert _left_in(tmp_path) == ["a", "empty", "t2.mha", "t2.nii", "x.json"]


def test_an_empty_image_on_a_full_disk_raises_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    """What SimpleITK does on a full disk: prints NWAD, returns, leaves 0 bytes."""
    monkeypatch.setattr(io.sitk, "WriteImage", lambda _img, name, **_kw: Path(name).touch())
    _disk_full(monkeypatch)
    with pytest.raises(TransientError) as error:
        write_image_atomic(_image(), tmp_path / "t2w.nii.gz")
    message = str(error.value)
    assert "no space left on device" in message
    assert "t2w.nii.gz" in message and str(tmp_path) in message
    assert "empty" in message
    assert _left_in(tmp_path) == []


@pytest.mark.parametrize("name", ["t2w.nii.gz", "t2w.nii"])
def test_a_truncated_image_is_refused(tmp_path: Path, monkeypatch, name: str) -> None:
    real = sitk.WriteImage

    def truncating(image: sitk.Image, file: str, **kwargs) -> None:
        real(image, file, **kwargs)
        os.truncate(file, os.path.getsize(file) // 2)

    monkeypatch.setattr(io.sitk, "WriteImage", truncating)
    with pytest.raises(TransientError, match=rf"could not write {name}: the (gzip|image)"):
        write_image_atomic(_image(), tmp_path / name)
    assert _left_in(tmp_path) == []


def test_a_header_that_reads_back_wrong_is_refused(tmp_path: Path, monkeypatch) -> None:
    real = sitk.WriteImage
    monkeypatch.setattr(io.sitk, "WriteImage", lambda img, f, **kw: real(img[:, :, :3], f, **kw))
    with pytest.raises(TransientError, match="reads back as size"):
        write_image_atomic(_image(), tmp_path / "t2w.nii.gz")
    assert _left_in(tmp_path) == []


def test_text_write_errors_name_the_file_and_the_full_disk(tmp_path, monkeypatch) -> None:
    def no_space(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", no_space)  # a deferred write error, reported by fsync
    with pytest.raises(TransientError, match=r"could not write summary.json: no space left"):
        write_json_atomic(tmp_path / "summary.json", {"a": 1})
    assert _left_in(tmp_path) == []


def _ctx(tmp_path: Path, output_root: Path) -> RunContext:
    url = f"sqlite:///{tmp_path / 'provenance.sqlite'}"
    upgrade(url)
    return RunContext(database_url=url, output_root=output_root)


def _write_step(ctx: RunContext, image: sitk.Image):
    out = ctx.output_root / "sub" / "t2w.nii.gz"

    def work() -> tuple[list[FileRef], dict]:
        write_image_atomic(image, out)
        return [FileRef.of("t2w", out)], {}

    return out, execute_step(
        ctx, patient=None, step="n4", version="1", inputs=[], parameters={}, run=work
    )


def _statuses(ctx: RunContext) -> list[str]:
    with Session(engine_for(ctx.database_url)) as session:
        return list(session.exec(select(StepRun.status).order_by(StepRun.id)))


def test_a_step_on_a_full_disk_fails_then_completes_once_space_is_freed(
    tmp_path: Path, monkeypatch
) -> None:
    ctx = _ctx(tmp_path, tmp_path / "out")
    image = _image()
    with monkeypatch.context() as full:
        full.setattr(io.sitk, "WriteImage", lambda _img, name, **_kw: Path(name).touch())
        _disk_full(full)
        with pytest.raises(TransientError, match="t2w.nii.gz: no space left on device"):
            _write_step(ctx, image)
    assert _left_in(tmp_path / "out" / "sub") == []
    assert _statuses(ctx) == ["failed"]
    out, outcome = _write_step(ctx, image)  # space freed: the rerun computes and completes
    assert outcome.status == "completed" and _statuses(ctx) == ["failed", "completed"]
    assert sitk.ReadImage(str(out)).GetSize() == image.GetSize()
    assert _write_step(ctx, image)[1].status == "cached"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root and a mount that is allowed here; skipped otherwise)."""
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    folder = tmp_path / "tiny"
    folder.mkdir()
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True, timeout=30, check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` up: a filler file holding every free byte."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_a_real_full_disk_fails_the_step_and_the_rerun_completes(
    tmp_path: Path, tiny_disk: Path
) -> None:
    ctx = _ctx(tmp_path, tiny_disk)  # the database lives outside the tiny disk
    (tiny_disk / "sub").mkdir()
    filler = _fill(tiny_disk)
    image = _image((10, 100, 100))  # random float32: 400 kB that gzip cannot shrink much
    with pytest.raises(TransientError) as error:
        _write_step(ctx, image)
    assert "no space left on device" in str(error.value)
    assert str(tiny_disk / "sub" / "t2w.nii.gz") in str(error.value)
    assert _left_in(tiny_disk / "sub") == []  # neither the final name nor a temporary file
    assert _statuses(ctx) == ["failed"]
    filler.unlink()
    out, outcome = _write_step(ctx, image)
    assert outcome.status == "completed"
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.array_equal(back, sitk.GetArrayFromImage(image))
