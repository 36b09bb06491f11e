"""The progress display of a training run: one row per network, epochs done and the latest loss."""

from __future__ import annotations

from collections.abc import Callable

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class EpochBar:
    """One network's row in the progress display (epochs done, the running loss); silent without one."""

    def __init__(self, progress: Progress | None, arch: str, epochs: int, done: int) -> None:
        self.progress = progress
        self.task = (
            None if progress is None else progress.add_task(arch, total=epochs, completed=done, status="")
        )

    def batch(self, epoch: int) -> Callable[[float], None]:
        def on_batch(loss: float) -> None:
            if self.progress is not None:
                self.progress.update(self.task, status=f"epoch {epoch} loss {loss:.4f}")

        return on_batch

    def epoch_done(self, epoch: int, status: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=epoch, status=status)


def progress_display(enabled: bool) -> Progress:
    """Rows of epochs done per network, with the latest loss; ``enabled=False`` shows nothing."""
    return Progress(
        TextColumn("[bold]{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not enabled,
    )
