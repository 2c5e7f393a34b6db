"""Errors raised by the image-processing steps.

Every error carries the context a user needs to act on it: the (pseudonymous) patient,
the step, the file or series involved, what is wrong and, where known, how to fix it.
``InputError`` is bad or unusable input: retrying cannot help, so it is never retried.
``TransientError`` is a failure that may pass (I/O hiccup, GPU out of memory): retry it.
"""

from __future__ import annotations

from pathlib import Path


class StepError(Exception):
    """A step failed; the message names patient, step, path and problem."""

    def __init__(
        self,
        problem: str,
        *,
        patient: str | None = None,
        step: str | None = None,
        path: str | Path | None = None,
        hint: str | None = None,
        details: dict | None = None,
    ) -> None:
        self.problem = problem
        self.patient = patient
        self.step = step
        self.path = str(path) if path is not None else None
        self.hint = hint
        self.details = details  # JSON, recorded with the failed step (e.g. what ingest found)
        super().__init__(self._message())

    def __reduce__(self):  # keep the context when pickled (process and Dask workers)
        kwargs = {
            "patient": self.patient,
            "step": self.step,
            "path": self.path,
            "hint": self.hint,
            "details": self.details,
        }
        return (_rebuild, (type(self), self.problem, kwargs))

    def _message(self) -> str:
        where = []
        if self.patient:
            where.append(f"patient {self.patient}")
        if self.step:
            where.append(f"step {self.step}")
        if self.path:
            where.append(f"in {self.path}")
        text = f"[{', '.join(where)}] {self.problem}" if where else self.problem
        return f"{text} (hint: {self.hint})" if self.hint else text


class InputError(StepError):
    """The input is missing, malformed or unusable. Not retried."""


class TransientError(StepError):
    """A failure that may pass on retry (I/O, resource exhaustion)."""


def _rebuild(cls: type[StepError], problem: str, kwargs: dict) -> StepError:
    return cls(problem, **kwargs)
