"""What a sweep reports as it goes: a small callback interface (the way Ray Tune's ``Callback``
works) and the summary it ends with.

``run_sweep(..., callbacks=[...])`` calls, in the driver's process and thread:

- ``on_start(summary, todo)``: the blocks to run are known (``todo``: BlockTasks);
- ``on_block_start(tasks, worker, attempts)``: a batch of blocks was sent to actor ``worker``;
- ``on_block_done(task, rows)``: a block finished; ``rows`` are its manifest rows (not yet committed);
- ``on_block_failed(task, error, final)``: a block's attempt failed; ``final``: it will not be
  retried and is recorded as failed;
- ``on_commit(rows, blocks)``: rows of ``blocks`` blocks were committed to the manifest;
- ``on_blocks_end(summary)``: no block runs any more (all done, or the dispatch stopped); stage 3 follows;
- ``on_end(summary)``: the sweep ended (stage 3 included), its summary complete. Not called when
  the sweep stops with an error (the error is raised from ``run_sweep``).

The progress bar (``ProgressEvents``) and the summary's counts (``SummaryEvents``) are callbacks too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console

from ldam_sweep.cluster.progress import SweepProgress


@dataclass
class SweepSummary:
    store: str
    planned_blocks: int
    skipped_blocks: int  # already committed when this run started
    done_blocks: int
    failed_blocks: int
    units_done: int
    units_failed: int
    seconds: float
    interrupted: bool = False
    signal: str | None = None  # what interrupted it: SIGINT (Ctrl-C) or SIGTERM
    discriminator_accuracy: float | None = None
    prior_digest: str | None = None  # method walk: the digest of the score prior the sweep walked on
    realism: dict[str, Any] | None = None  # stage 3: pooled two-sample accuracy and HF ratio, seconds
    workers: list[str] = field(default_factory=list)
    worker_niceness: list[int] = field(default_factory=list)  # the started actors' nice values (0 = normal)
    # where the time before the first batch went: driver_s (spec, model, plan, store, lease), ray_init_s,
    # first_worker_s (actors asked for until the first one is ready) and that worker's own parts (worker)
    startup: dict[str, Any] = field(default_factory=dict)

    @property
    def units_per_second(self) -> float:
        return self.units_done / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "units_per_second": self.units_per_second}


class SweepCallback:
    """Override the events you need; each does nothing by default."""

    def on_start(self, summary: SweepSummary, todo: list[Any]) -> None: ...

    def on_block_start(self, tasks: list[Any], worker: int, attempts: list[int]) -> None: ...

    def on_block_done(self, task: Any, rows: list[dict[str, Any]]) -> None: ...

    def on_block_failed(self, task: Any, error: str, final: bool) -> None: ...

    def on_commit(self, rows: list[dict[str, Any]], blocks: int) -> None: ...

    def on_blocks_end(self, summary: SweepSummary) -> None: ...

    def on_end(self, summary: SweepSummary) -> None: ...


class Callbacks(SweepCallback):
    """Several callbacks as one, called in order."""

    def __init__(self, callbacks: list[SweepCallback]) -> None:
        self.callbacks = list(callbacks)

    def _each(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(*args)

    def on_start(self, summary: SweepSummary, todo: list[Any]) -> None:
        self._each("on_start", summary, todo)

    def on_block_start(self, tasks: list[Any], worker: int, attempts: list[int]) -> None:
        self._each("on_block_start", tasks, worker, attempts)

    def on_block_done(self, task: Any, rows: list[dict[str, Any]]) -> None:
        self._each("on_block_done", task, rows)

    def on_block_failed(self, task: Any, error: str, final: bool) -> None:
        self._each("on_block_failed", task, error, final)

    def on_commit(self, rows: list[dict[str, Any]], blocks: int) -> None:
        self._each("on_commit", rows, blocks)

    def on_blocks_end(self, summary: SweepSummary) -> None:
        self._each("on_blocks_end", summary)

    def on_end(self, summary: SweepSummary) -> None:
        self._each("on_end", summary)


class SummaryEvents(SweepCallback):
    """Counts finished and failed blocks and units, and the workers that ran them, into the summary."""

    def __init__(self, summary: SweepSummary) -> None:
        self.summary = summary
        self.workers: set[str] = set()

    def on_block_done(self, task: Any, rows: list[dict[str, Any]]) -> None:
        self.summary.done_blocks += 1
        self.summary.units_done += len(rows)
        self.workers.add(rows[0]["worker"])
        self.summary.workers = sorted(self.workers)

    def on_block_failed(self, task: Any, error: str, final: bool) -> None:
        if final:
            self.summary.failed_blocks += 1
            self.summary.units_failed += len(task.units)


class ProgressEvents(SweepCallback):
    """The progress bar on a terminal, periodic log lines elsewhere."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: SweepProgress | None = None

    def on_start(self, summary: SweepSummary, todo: list[Any]) -> None:
        self.progress = SweepProgress(sum(len(t.units) for t in todo), self.console)

    def on_block_done(self, task: Any, rows: list[dict[str, Any]]) -> None:
        if self.progress is not None:
            self.progress.update(done=len(rows))

    def on_block_failed(self, task: Any, error: str, final: bool) -> None:
        if final and self.progress is not None:
            self.progress.update(failed=len(task.units))

    def on_blocks_end(self, summary: SweepSummary) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
