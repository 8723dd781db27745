"""Progress bars of the long single-process commands (eval, extract, export)."""
from __future__ import annotations

from typing import Any, Callable


class _progress:
    """A rich progress bar on a terminal (plain log lines otherwise); yields ``advance()``."""

    def __init__(self, enabled: bool, description: str, total: int | None):
        self.enabled, self.description, self.total = enabled, description, total
        self.bar = None

    def __enter__(self) -> Callable[[int], None]:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            console = Console(stderr=True)
            self.bar = Progress(TextColumn(f"[bold]{self.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                                disable=not console.is_terminal)
            self.task = self.bar.add_task(self.description, total=self.total)
            self.bar.start()
        return self._advance

    def _advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def progress_bar(enabled: bool, description: str, total: int | None) -> _progress:
    return _progress(enabled, description, total)
