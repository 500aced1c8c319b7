"""Progress for the Python API's long calls (``ls.sample(..., progress=True)``,
``train_discriminator(..., progress=True)``): a rich progress bar on stderr (a live widget in a
notebook) with what is done, the rate and the time left. A sweep reports through its own progress
lines (``cluster/progress.py``)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

Progress = bool | Callable[..., None] | None


@contextlib.contextmanager
def progress_bar(progress: Progress, total: int, what: str) -> Iterator[Callable[..., None] | None]:
    """Yields the callback to call with the number done so far (and anything after it), or None.

    ``progress``: ``True`` draws a bar of ``total`` steps titled ``what``; a callable is yielded as
    it is (the caller's own reporting); ``False``/``None`` yields None."""
    if not progress:
        yield None
        return
    if callable(progress):
        yield progress
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn

    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
             TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(what, total=total, info="")

        def advance(done: int, info: Any = None) -> None:
            text = ""
            if isinstance(info, dict):
                text = " ".join(f"{k} {v:.3g}" for k, v in info.items() if k in ("loss", "accuracy"))
            bar.update(task, completed=done, info=text)

        yield advance
