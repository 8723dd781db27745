"""The one writer of metrics JSON text (``final_metrics.json``, ``best.json``, eval
``metrics.json``, ``bins.json``, THz reports) and the value of a metric that could not
be computed.

Python's ``json`` writes ``NaN`` / ``Infinity`` by default, which strict readers (JSON.parse,
jq, Go, Rust serde) refuse; here a non-finite number becomes ``null`` and ``allow_nan=False``
makes any one that slips through an error instead of a file others cannot read. Numpy scalars
become Python numbers. Keys starting with ``_`` are private (report internals) and left out.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np

__all__ = ["NotComputed", "json_safe", "json_text", "not_computed_reasons"]


class NotComputed(float):
    """A metric with no value (NaN for arithmetic, CSV and TensorBoard) that says why:
    ``NotComputed("no gender labels in the split")``. Tables print the reason, JSON holds
    ``null`` (and the reasons under ``not_computed``, :func:`not_computed_reasons`)."""

    reason: str

    def __new__(cls, reason: str) -> "NotComputed":
        obj = super().__new__(cls, float("nan"))
        obj.reason = reason
        return obj

    def __reduce__(self) -> tuple[Any, ...]:  # gathered between ranks: keep the reason
        return (NotComputed, (self.reason,))

    def __repr__(self) -> str:
        return f"NotComputed({self.reason!r})"


def not_computed_reasons(metrics: Mapping[str, Any]) -> dict[str, str]:
    """``{name: reason}`` of the metrics that could not be computed."""
    return {k: v.reason for k, v in metrics.items() if isinstance(v, NotComputed)}


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as ``None``, numpy scalars/arrays as Python values and
    ``_private`` keys dropped."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def json_text(obj: Any, indent: int = 1) -> str:
    """Strict JSON text of ``obj`` (see the module doc), ending in a newline."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n"
