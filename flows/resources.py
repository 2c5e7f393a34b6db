"""CPU thread limits applied in each worker process.

ITK/SimpleITK, torch and the BLAS libraries each start as many threads as there are cores
by default; with several workers that oversubscribes the CPU. Every task calls
:func:`apply_thread_limits` before processing so that ``workers × threads ≤ cores``.

The limits are process-wide, and a worker process runs several task threads at once, so
they are applied once per process and value, under a lock: changing ITK's global thread
count while another thread runs a filter, or touching ``torch`` while another thread is
still importing it, crashed runs ("partially initialized module 'torch' has no attribute
'set_num_threads'", a segfault in SimpleITK).
"""

from __future__ import annotations

import os
import sys
import threading

import SimpleITK as sitk
from threadpoolctl import threadpool_limits

from tasks.register import set_itk_threads

_BLAS_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)

_LOCK = threading.Lock()
_APPLIED: dict[str, int] = {}  # "threads" -> the value in effect in this process


def apply_thread_limits(threads: int) -> None:
    """Limit ITK, SimpleITK, elastix, torch and BLAS to ``threads`` threads in this process.

    Environment variables cover libraries loaded later (and child processes); libraries
    already imported are set directly. A repeated call with the value in effect does
    nothing; torch is set only once its import has finished (the segmentation backends
    set their own torch thread count when they load a model).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    with _LOCK:
        if _APPLIED.get("threads") == threads:
            return
        for name in _BLAS_VARIABLES:
            os.environ[name] = str(threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        threadpool_limits(threads)
        set_num_threads = getattr(sys.modules.get("torch"), "set_num_threads", None)
        if set_num_threads is not None:
            set_num_threads(threads)
        set_itk_threads(threads)  # itk-elastix, only if loaded (importing it costs seconds)
        _APPLIED["threads"] = threads
