"""rich progress bars for long loops: one bar for epochs, one for the batches of the current epoch.

The console is shared with the logging handler so bars and log lines do not overwrite each other. Bars are
shown only on an interactive terminal; elsewhere (CI, subprocess tests, clusters) each finished epoch is
logged as one line instead, which keeps log files readable.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
log = logging.getLogger("bise")


class _Bar:
    def __init__(self, progress: Progress | None, description: str, epochs: int, batches: int):
        self.progress, self.description, self.epochs, self.batches = progress, description, epochs, batches
        self.epoch = 0
        self.started = time.perf_counter()
        if progress is not None:
            self.epoch_task = progress.add_task(description, total=epochs)
            self.batch_task = progress.add_task("  batches", total=batches)

    def advance_batch(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.batch_task, n)

    def advance_epoch(self, status: str = "") -> None:
        self.epoch += 1
        if self.progress is not None:
            self.progress.update(self.epoch_task, advance=1, description=f"{self.description} {status}")
            self.progress.reset(self.batch_task, total=self.batches)
        else:
            elapsed = time.perf_counter() - self.started
            log.info("%s epoch %d/%d %s (%.1fs)", self.description, self.epoch, self.epochs, status, elapsed)


@contextmanager
def progress_bar(description: str, epochs: int, batches_per_epoch: int):
    """Context manager yielding an object with advance_batch() and advance_epoch(status)."""
    if not console.is_terminal:
        yield _Bar(None, description, epochs, batches_per_epoch)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield _Bar(progress, description, epochs, batches_per_epoch)
