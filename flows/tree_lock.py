"""One pipeline run at a time per output tree: an exclusive lock on ``<output_root>/.run.lock``.

Two ``run`` commands on one output tree both computed every step (rows and work doubled).
The lock is an ``flock`` on a file under the output root, so it is released by the kernel
when its process ends, however it ends (``kill -9`` included): a stale lock file never
blocks a later run. The file holds the holder's process id and start time (no paths, no
identifiers). Within one process the lock is re-entrant (the demo flow runs the cohort flow
inside its own run), counted per output root.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".run.lock"

_GUARD = threading.Lock()
_HELD: dict[Path, tuple[int, int]] = {}  # output root -> (file descriptor, depth)


class OutputTreeBusy(RuntimeError):
    """Another process is running the pipeline on this output tree."""


@contextmanager
def output_tree_lock(output_root: Path) -> Iterator[None]:
    """Hold the output tree's lock for the block.

    Raises
    ------
    OutputTreeBusy
        Another process holds it; the message says which process and since when.
    """
    root = Path(output_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    _acquire(root)
    try:
        yield
    finally:
        _release(root)


def _acquire(root: Path) -> None:
    with _GUARD:
        if root in _HELD:
            fd, depth = _HELD[root]
            _HELD[root] = (fd, depth + 1)
            return
        path = root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputTreeBusy(
                f"another pipeline run is using the output tree {root} ({holder}); wait for "
                "it to finish or choose another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0
        )
        _HELD[root] = (fd, 1)


def _release(root: Path) -> None:
    with _GUARD:
        fd, depth = _HELD[root]
        if depth > 1:
            _HELD[root] = (fd, depth - 1)
            return
        del _HELD[root]
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
