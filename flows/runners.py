"""Task runners: a bounded thread pool on one machine, or a running Dask cluster.

Prefect's ``ThreadPoolTaskRunner`` has no bound by default (``sys.maxsize`` threads): a
1,386-patient fan-out started ~12,000 threads and stalled, and each thread's ITK/torch
threads oversubscribed the CPU. Every flow of this platform therefore runs on
:class:`SettingsTaskRunner`, whose thread count is ``threads.workers`` from the settings in
effect when the flow starts (``PROSTATE_COHORT_*`` environment variables, e.g. set in a
work pool's job variables, and ``PROSTATE_COHORT_CONFIG``). The command line passes its
``--config`` file's value explicitly (:func:`task_runner`).

Scale-out uses Dask (``prefect-dask``) on a cluster the operator runs: one Dask worker
process per patient slot, each with ``threads_per_worker=1`` and the pipeline's
``threads.threads_per_worker`` for ITK/torch inside it.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.task_runners import ThreadPoolTaskRunner

from flows.settings import Settings, SettingsError, load_settings

Runner = Literal["threads", "dask"]


class SettingsTaskRunner(ThreadPoolTaskRunner):
    """A thread pool of ``threads.workers`` threads, read from the settings at flow start.

    ``max_workers`` given explicitly wins; otherwise it is resolved when the flow enters the
    runner, so a deployment's environment decides it, not the import.
    """

    def __init__(self, max_workers: int | None = None) -> None:
        super().__init__(max_workers=max_workers or 1)
        self._from_settings = max_workers is None

    def duplicate(self) -> SettingsTaskRunner:
        return type(self)(None if self._from_settings else self._max_workers)

    def __enter__(self) -> SettingsTaskRunner:
        if self._from_settings:
            self._max_workers = load_settings().threads.workers
        return super().__enter__()


def task_runner(settings: Settings, runner: Runner = "threads", address: str | None = None) -> Any:
    """The task runner for a command-line run.

    Parameters
    ----------
    runner
        ``"threads"``: ``settings.threads.workers`` threads in this process.
        ``"dask"``: the Dask scheduler at ``address`` (``tcp://host:8786``); its workers must
        have this project installed and reach the same storage and databases.
    """
    if runner == "threads":
        if address is not None:
            raise SettingsError("--address is for --runner dask")
        return SettingsTaskRunner(max_workers=settings.threads.workers)
    if runner == "dask":
        if not address:
            raise SettingsError("--runner dask needs --address tcp://HOST:PORT of a Dask scheduler")
        from prefect_dask import DaskTaskRunner  # noqa: PLC0415 - optional engine

        return DaskTaskRunner(address=address)
    raise SettingsError(f"unknown runner {runner!r}: use threads or dask")
