"""A rich progress bar over finished requests; silent when quiet or not on a terminal."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RunProgress:
    """Context manager; `done(ok)` after every finished request."""

    def __init__(self, total: int | None, description: str, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total = total
        self.description = description
        self.failed = 0
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> "RunProgress":
        if self.enabled:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("[red]{task.fields[failed]} failed"),
                                      console=Console(stderr=True), refresh_per_second=4, transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, failed=0)
        return self

    def done(self, ok: bool) -> None:
        if not ok:
            self.failed += 1
        if self._progress is not None:
            self._progress.update(self._task, advance=1, failed=self.failed)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
