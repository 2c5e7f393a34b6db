"""GPU slots: segmentation on a GPU holds one slot of Prefect's global concurrency limit.

Several task threads, worker processes or hosts may segment at once; the GPU work among
them is held to the limit named :data:`GPU_LIMIT` (``gpu``), which the server enforces
across processes. Its size should equal the number of GPUs the workers share:

* on one machine it is created on first use with one slot per CUDA device this process
  sees (:func:`ensure_gpu_limit`);
* on several hosts the operator creates it once with the total, e.g. ``prefect gcl create
  gpu --limit 4`` (an existing limit is never changed here).

CPU-only runs take no slot, so segmentation still runs (and runs in parallel) without GPUs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

GPU_LIMIT = "gpu"
_LOCK = threading.Lock()
_ENSURED: set[str] = set()


def cuda_device_count() -> int:
    """CUDA devices torch sees in this process (0 without torch or a GPU)."""
    try:
        import torch  # noqa: PLC0415 - only where segmentation runs
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def ensure_gpu_limit(slots: int | None = None, name: str = GPU_LIMIT) -> int:
    """Create the global concurrency limit ``name`` unless it exists; return its size.

    Parameters
    ----------
    slots
        Size of a new limit; default: :func:`cuda_device_count` (at least 1).
    """
    from prefect.client.orchestration import get_client  # noqa: PLC0415
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate  # noqa: PLC0415
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound  # noqa: PLC0415

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            pass
        size = slots if slots is not None else max(1, cuda_device_count())
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=size)
            )
        except ObjectAlreadyExists:  # another worker created it meanwhile
            return client.read_global_concurrency_limit_by_name(name).limit
        return size


@contextmanager
def gpu_slot(uses_gpu: bool, name: str = GPU_LIMIT) -> Iterator[None]:
    """Hold one slot of the GPU limit for the block when ``uses_gpu``; else do nothing."""
    if not uses_gpu:
        yield
        return
    from prefect.concurrency.sync import concurrency  # noqa: PLC0415

    with _LOCK:
        if name not in _ENSURED:
            ensure_gpu_limit(name=name)
            _ENSURED.add(name)
    with concurrency(name, occupy=1, strict=True):
        yield
