"""The pipeline's steps, in pipeline order: one name, one version, one definition each.

A step's ``name`` is what the provenance database records (``<name>_<model>`` for the steps
that run once per segmentation model), the Prefect task's name, the prefix of its task-run
names and a ``--force-step`` choice. Its ``version`` sits next to its kernel and changes
when the kernel's results change: cached results of an older version are not reused.

``resources`` (threads, device) say how a step runs, not what it computes: they are kept
out of the cache key and recorded as provenance, so a cohort rerun with another number of
workers, threads or another device reuses what is done.

Kernels and parameter models are named as ``module:attribute`` and imported on demand, so
the kernels themselves can take their names from here (no import cycle) and the command
line checks ``--force-step`` without loading any image library.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Parameter fields that are resources, at any depth of a step's parameters.
RESOURCE_FIELDS = frozenset({"threads", "device"})


@dataclass(frozen=True)
class StepSpec:
    """One pipeline step: what it is called, which code computes it, what it makes."""

    name: str
    version: str
    kernel: str
    """The image-processing function, ``module:function``."""
    params: str | None
    """Its parameter model (a pydantic model), ``module:Class``; None: no parameters."""
    outputs: tuple[str, ...]
    """Output roles; ``{b}`` stands for a b-value label, ``{model}`` for a model name."""
    per_model: bool = False
    """Runs once per segmentation model and is recorded as ``<name>_<model>``."""
    retries: int = 1
    """Prefect retries of a transient failure (never of bad input)."""
    retry_delay_s: float = 0.0

    @property
    def task_run_name(self) -> str:
        """Prefect task-run name template (``n4-P1a2b...``, ``segment-taps-P1a2b...``)."""
        return (
            f"{self.name}-{{model}}-{{patient}}" if self.per_model else f"{self.name}-{{patient}}"
        )

    def recorded(self, model: str | None = None) -> str:
        """The step name recorded in the database (``segment_taps`` for a per-model step)."""
        if self.per_model:
            if not model:
                raise ValueError(f"step {self.name!r} runs per model: give the model")
            return f"{self.name}_{model}"
        return self.name

    def parameter_model(self) -> type | None:
        return None if self.params is None else _load(self.params)

    def kernel_function(self) -> Any:
        return _load(self.kernel)


def _load(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


SYNTHESIZE = StepSpec(
    "synthesize", "1", "phantom.exam:generate_exam", None, ("truth_json",), retries=0
)
INGEST = StepSpec(
    "ingest",
    "2",
    "tasks.ingest:ingest_exam",
    None,  # its one setting (min_b_values) is a keyword of ingest_exam
    ("t2w_raw", "dwi_b{b}_raw", "computed_dwi_b{b}_raw", "adc_scanner", "ingest_json"),
    retries=2,
    retry_delay_s=5.0,
)
DENOISE = StepSpec(
    "denoise",
    "1",
    "tasks.denoise:denoise_t2",
    "tasks.denoise:T2DenoiseParams",
    ("t2w_denoised", "dwi_b{b}_denoised", "hbv_denoised"),
)
N4 = StepSpec(
    "n4",
    "1",
    "tasks.bias:correct_bias_n4",
    "tasks.bias:N4Params",
    ("t2w_n4", "t2w_biasfield", "dwi_b{b}_n4", "hbv_n4", "dwi_biasfield"),
)
REGISTER = StepSpec(
    "register",
    "2",
    "tasks.chain:register_exam",
    "tasks.register:RegistrationParams",
    ("dwi_b{b}_moco", "xfm_b{b}_to_lowb", "xfm_t2_to_dwi"),
)
B1000 = StepSpec(
    "b1000", "2", "tasks.chain:fit_b1000", "tasks.dwi:DwiFitParams", ("b1000_native", "dwi_b1000")
)
ADC = StepSpec("adc", "2", "tasks.chain:fit_adc", "tasks.dwi:DwiFitParams", ("adc_native", "adc"))
SEGMENT = StepSpec(
    "segment",
    "1",
    "tasks.segment:get_backend",
    "tasks.segment:SegmentationParams",
    ("mask", "mask_json"),
    per_model=True,
)
RADIOMICS = StepSpec(
    "radiomics",
    "1",
    "tasks.measure:extract_radiomics",
    None,
    ("radiomics_csv",),
    per_model=True,
)
QC = StepSpec(
    "qc",
    "2",
    "tasks.qc_metrics:exam_qc_metrics",
    None,
    ("qc", "qc_json"),
    per_model=True,
    retries=0,
)

#: Every step, in pipeline order.
STEPS: tuple[StepSpec, ...] = (
    SYNTHESIZE,
    INGEST,
    DENOISE,
    N4,
    REGISTER,
    B1000,
    ADC,
    SEGMENT,
    RADIOMICS,
    QC,
)
BY_NAME: Mapping[str, StepSpec] = {spec.name: spec for spec in STEPS}


def step_names() -> tuple[str, ...]:
    return tuple(BY_NAME)


def check_step_names(names: list[str] | tuple[str, ...] | frozenset[str]) -> None:
    """Every name is a step name (``--force-step``), else ValueError listing the valid ones."""
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        raise ValueError(
            f"unknown step(s) {', '.join(unknown)}; valid steps: {', '.join(step_names())}"
        )


def split_resources(parameters: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(what the step computes, how it runs)``: the parameters without the
    :data:`RESOURCE_FIELDS`, and those fields by dotted path (``t2.threads``)."""
    kept: dict[str, Any] = {}
    resources: dict[str, Any] = {}
    for key, value in parameters.items():
        if key in RESOURCE_FIELDS:
            resources[key] = value
        elif isinstance(value, Mapping):
            inner, inner_resources = split_resources(value)
            kept[key] = inner
            resources.update({f"{key}.{k}": v for k, v in inner_resources.items()})
        else:
            kept[key] = value
    return kept, resources
