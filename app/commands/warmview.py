"""Progress of `warm`: rich bars per image and layer on a terminal, nothing otherwise."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class QuietView:
    """Not a terminal: no output at all."""

    def image(self, name: str, total: int) -> Any:
        """A task for one image."""
        return None

    def layer(self, image_task: Any, label: str, size: int) -> Callable[[int], None]:
        """A task for one layer; returns the function that advances it."""
        return lambda n: None


class RichView:
    """One bar per image (all its bytes) and one per layer."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    def image(self, name: str, total: int) -> Any:
        """A bar for the image's total bytes."""
        return self.progress.add_task(name, total=total or None)

    def layer(self, image_task: Any, label: str, size: int) -> Callable[[int], None]:
        """A bar for the layer; advancing it advances the image's bar too."""
        task = self.progress.add_task(f"  {label}", total=size or None)

        def advance(n: int) -> None:
            self.progress.advance(task, n)
            self.progress.advance(image_task, n)

        return advance


@contextlib.contextmanager
def make_view(tty: bool) -> Iterator[QuietView | RichView]:
    """The progress display for this stdout."""
    if not tty:
        yield QuietView()
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    )
    with Progress(*columns) as progress:
        yield RichView(progress)
