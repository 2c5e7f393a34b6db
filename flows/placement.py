"""Where a step runs on a Dask cluster: segmentation on the workers that have a GPU.

On a Dask cluster each patient's flow runs on one worker (the ``patient`` task). A step
that needs what only some workers have (``segmentation.dask_resources``, e.g. ``{"GPU":
1}``, matching ``dask worker ... --resources GPU=1`` on the GPU hosts) is sent to such a
worker as a task run of the patient's flow run, while the patient's worker waits for it
without holding its slot (Dask's ``secede``/``rejoin``), so CPU hosts preprocess other
patients meanwhile and a GPU worker busy with a patient of its own still takes the
segmentation. Without resources, or outside a Dask worker, the step runs in this process.
Each worker process keeps its models loaded (:func:`tasks.segment.get_backend`), so a model
is loaded once per GPU worker, not once per patient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import Task


def dask_worker_address() -> str | None:
    """The scheduler address when this code runs inside a Dask worker, else None."""
    try:
        from distributed import get_worker  # noqa: PLC0415 - optional engine
    except ImportError:
        return None
    try:
        return get_worker().scheduler.address
    except ValueError:  # not in a worker
        return None


def run_placed(task: Task, resources: Mapping[str, float], *args: Any) -> Any:
    """``task(*args)``: here, or on a Dask worker of this cluster that has ``resources``.

    Raises whatever the task raises, wherever it ran.
    """
    scheduler = dask_worker_address() if resources else None
    if scheduler is None:
        return task(*args)
    from distributed import rejoin, secede  # noqa: PLC0415
    from prefect_dask.client import PrefectDaskClient  # noqa: PLC0415

    with PrefectDaskClient(scheduler, set_as_default=False) as client:
        future = client.submit(task, *args, resources=dict(resources), pure=False)
        secede()  # free this worker's slot while the other worker runs the step
        try:
            return future.result()
        finally:
            rejoin()
