"""How ``demo``, ``run`` and ``ingest`` show their outcome: one line per patient (or JSON)."""

from __future__ import annotations

import json
from typing import Any


def report_patients(
    patients: list[dict[str, Any]],
    as_json: bool,
    *,
    header: str,
    skipped: list[dict[str, Any]] | None = None,
) -> int:
    """Print per-patient results (and, for ``run``/``ingest``, the paths discovery skipped,
    with the reason); exit code 1 when any patient failed."""
    if as_json:
        shown: dict[str, Any] = {"patients": [_json_entry(p) for p in patients]}
        if skipped is not None:
            shown["skipped"] = skipped
        print(json.dumps(shown, indent=2))
    else:
        print(header)
        for p in patients:
            if p["status"] == "ok":
                found = ", ".join(_describe(s) for s in p["series"])
                print(f"  {p['patient']}  {p['source']}: ok{_what_ran(p)}: {found}")
            else:
                step = f" in step {p['step']}" if p.get("step") else ""
                print(f"  {p['patient']}  {p['source']}: ERROR{step}: {p['error']}")
        n_failed = sum(p["status"] != "ok" for p in patients)
        for s in skipped or []:
            files = f" ({s['files']} files)" if s.get("files") else ""
            print(f"  skipped {s['path']}: {s['reason']}{files}")
        line = f"{len(patients)} patients, {n_failed} failed"
        print(line + (f", {len(skipped)} paths skipped" if skipped else ""))
    return 1 if any(p["status"] != "ok" for p in patients) else 0


def _what_ran(entry: dict[str, Any]) -> str:
    """`` (cached)`` when this run computed nothing for the patient, else the steps it ran."""
    if entry.get("cached"):
        return " (cached)"
    ran = entry.get("ran")
    return f" (ran {', '.join(ran)})" if ran else ""


def _describe(series: dict[str, Any]) -> str:
    b = series.get("b_value")
    return series["kind"] + (f" b{b:g}" if b is not None else "")


def _json_entry(p: dict[str, Any]) -> dict[str, Any]:
    keep = ("kind", "b_value", "source", "shape", "spacing", "image", "reason")
    return {
        "patient": p["patient"],
        "source": p["source"],
        "status": p["status"],
        "error": p["error"],
        "series": [{k: s[k] for k in keep if k in s} for s in p["series"]],
        "rejected": p.get("rejected", []),
        "found": p.get("found", []),
        "step": p.get("step"),
        "ran": p.get("ran"),
        "cached": p.get("cached"),
        "outputs": p.get("outputs", {}),
    }
