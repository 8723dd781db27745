"""The validation history as one picture of metric panels.

``ArtifactContext.validation_history`` holds the rows the trainer logged at each
validation (``step``, ``epoch`` and the metrics); a recipe picks which columns
share a panel and hands the rows here."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

Publish = Callable[[Path, Callable[[Path], None]], Any]


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of column ``key``: rows where both are finite numbers
    (a column logged at some validations only is blank or NaN at the others)."""
    xs, ys = [], []
    for r in rows:
        try:
            x, y = float(r.get("step", "nan")), float(r.get(key, "nan"))
        except (TypeError, ValueError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def in_unit_range(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    """Whether every point of ``key`` lies in [0, 1] (rates, AUC, SSIM...)."""
    return all(0.0 <= y <= 1.0 for y in series(rows, key)[1])


def plot_metrics(ax: Any, rows: Sequence[Mapping[str, Any]], keys: Sequence[str], **style: Any) -> Any:
    """Plot ``keys`` against the step on ``ax``; when 0-1 metrics meet others
    (PSNR in dB, a loss), the others go on a second y axis on the right, so
    neither flattens the other. Returns that axis, or None."""
    unit = [k for k in keys if in_unit_range(rows, k)]
    other = [k for k in keys if k not in unit]
    twin = ax.twinx() if unit and other else None
    for k in unit if twin is not None else keys:
        ax.plot(*series(rows, k), label=k, **style)
    if twin is not None:
        ax.set_ylabel("0-1 metrics")
        twin.set_ylabel(", ".join(other))
        for k in other:
            twin.plot(*series(rows, k), linestyle="--", label=k, **style)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7)
    else:
        ax.legend(fontsize=7)
    return twin


def plot_history(rows: Sequence[Mapping[str, Any]], panels: Mapping[str, Sequence[str]], out: Path,
                 publish: Publish) -> bool:
    """One panel per title of ``panels`` with the columns listed under it, against
    the optimizer step; panels (and columns) without a point are left out.
    Returns False, writing nothing, when no panel has a point."""
    shown = {title: [k for k in keys if series(rows, k)[0]] for title, keys in panels.items()}
    shown = {title: keys for title, keys in shown.items() if keys}
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.8), squeeze=False)
    for ax, (title, keys) in zip(axes[0], shown.items()):
        plot_metrics(ax, rows, keys, marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        publish(Path(out), lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)
    return True
