"""CPU thread limits applied in each worker process.

ITK/SimpleITK, torch and the BLAS libraries each start as many threads as there are cores
by default; with several workers that oversubscribes the CPU. Every worker calls
:func:`apply_thread_limits` before processing so that ``workers × threads ≤ cores``.
"""

from __future__ import annotations

import os
import sys

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


def apply_thread_limits(threads: int) -> None:
    """Limit ITK, SimpleITK, elastix, torch and BLAS to ``threads`` threads in this process.

    Environment variables cover libraries loaded later (and child processes); libraries
    already imported are set directly.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    for name in _BLAS_VARIABLES:
        os.environ[name] = str(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    threadpool_limits(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    set_itk_threads(threads)  # itk-elastix, only if loaded (importing it costs seconds)
