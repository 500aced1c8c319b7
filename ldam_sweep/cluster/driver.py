"""The driver: stage 1 (discriminator, once), then (layer, block) tasks dispatched to resident Ray
actors with a bounded number in flight, manifest rows committed in batches.

Crash semantics: a block counts as done only when its rows are committed; rerunning the same
command resumes from the manifest. Ray may run a block twice (actor restarts); that is harmless
(deterministic chains, whole-object overwrites, readers de-duplicate). A block that fails
``max_attempts`` times gets 'failed' rows with its error and the sweep goes on.
"""

from __future__ import annotations

import collections
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console

from ldam_sweep.cluster.progress import SweepProgress
from ldam_sweep.errors import LdamError, StoreError
from ldam_sweep.planning import BlockTask, StorePlan, block_tasks, store_url, sweep_store_plan
from ldam_sweep.spec import JobSpec, load_spec, parse_job
from ldam_sweep.store import commit, create_store, failed_rows, open_store
from ldam_sweep.store.layout import write_discriminator
from ldam_sweep.store.location import check_writable

PER_ACTOR_IN_FLIGHT = 2


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
    discriminator_accuracy: float | None = None
    workers: list[str] = field(default_factory=list)

    @property
    def units_per_second(self) -> float:
        return self.units_done / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "units_per_second": self.units_per_second}


def _job_doc(spec: JobSpec | dict[str, Any] | str | os.PathLike) -> tuple[JobSpec, dict[str, Any]]:
    if isinstance(spec, JobSpec):
        return spec, spec.model_dump(mode="json", exclude_none=True)
    if isinstance(spec, dict):
        job = parse_job(spec)
        return job, job.model_dump(mode="json", exclude_none=True)
    job = load_spec(spec)
    return job, job.model_dump(mode="json", exclude_none=True)


def run_sweep(
    spec: JobSpec | dict[str, Any] | str | os.PathLike,
    store: str | None = None,
    address: str | None = None,
    fresh: bool = False,
    *,
    console: Console | None = None,
    num_cpus: int | None = None,
) -> SweepSummary:
    """Run (or resume) a whole sweep. Local Ray by default; ``address`` joins an existing cluster."""
    from ldam_sweep.model import load_model

    console = console or Console(stderr=True)
    job, doc = _job_doc(spec)
    url = store_url(job, store)
    # everything that can be wrong with the spec fails here, before any work
    check_writable(url)
    model = load_model(job.model, device="cpu", log=lambda m: console.print(f"[dim]{m}[/dim]"))
    plan = sweep_store_plan(job, model, doc)
    tasks = block_tasks(plan)
    try:
        loc = create_store(url, plan, fresh=fresh)
    except OSError as err:  # permissions, missing bucket, unreachable endpoint
        raise StoreError(f"cannot create the store at {url!r}: {type(err).__name__}: {err}") from None
    console.print(f"store {loc.url}: {len(plan.layers)} layers, {sum(lp.planned_units() for lp in plan.layers)} units, "
                  f"{len(tasks)} blocks", highlight=False)

    st = open_store(loc.url)
    d_acc = _stage1(job, model, st, loc.url, console)
    committed = st.refresh().units(status=("ok", "dead"))  # dead units are done: not sampled again
    done_keys = {(r["layer"], r["block"]) for r in committed.select(["layer", "block"]).to_pylist()}
    todo = [t for t in tasks if t.key not in done_keys]
    console.print(f"resume: {len(tasks) - len(todo)} of {len(tasks)} blocks already committed, {len(todo)} to run",
                  highlight=False)
    summary = SweepSummary(store=loc.url, planned_blocks=len(tasks), skipped_blocks=len(tasks) - len(todo),
                           done_blocks=0, failed_blocks=0, units_done=0, units_failed=0, seconds=0.0,
                           discriminator_accuracy=d_acc)
    if not todo:
        return summary
    _dispatch(job, doc, loc.url, plan, todo, summary, console, address, num_cpus)
    return summary


def _stage1(job: JobSpec, model: Any, st: Any, url: str, console: Console) -> float | None:
    """Train or load the discriminator once and keep it in the store; a resumed sweep reuses it."""
    if job.discriminator is None:
        return None
    info = st.discriminator_info()
    if info is not None:
        console.print(f"stage 1: discriminator already in the store (held-out accuracy {info['heldout_accuracy']:.3f})",
                      highlight=False)
        return float(info["heldout_accuracy"])
    from ldam_sweep.model.loading import default_device
    from ldam_sweep.stage import discriminator_record, job_discriminator

    model.to(default_device())
    t0 = time.perf_counter()
    what = "loading" if job.discriminator.file is not None else "training"
    console.print(f"stage 1: {what} the discriminator on {model.device} ...", highlight=False)
    last = [time.perf_counter()]

    def report(i: int, stats: dict) -> None:
        if time.perf_counter() - last[0] > 10:
            last[0] = time.perf_counter()
            console.print(f"  D update {i}: loss {stats['loss']:.3f}, batch accuracy {stats['accuracy']:.2f}", highlight=False)

    trained = job_discriminator(job, model, progress=report)
    model.to("cpu")
    assert trained is not None
    write_discriminator(url, trained.to_bytes(), discriminator_record(trained))
    console.print(f"stage 1: held-out accuracy {trained.heldout_accuracy:.3f} "
                  f"(real {trained.heldout_real_accuracy:.3f}, fresh chains {trained.heldout_fake_accuracy:.3f}) "
                  f"in {time.perf_counter() - t0:.0f}s", highlight=False)
    return trained.heldout_accuracy


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"namespace": "ldam-sweep", "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise LdamError(f"cannot start or join Ray (address {address or 'local'!r}): {err}. "
                        "Committed work is kept; fix the address and rerun.") from None
    return True


class WorkerPool:
    """The resident actors: admission of the started ones, and submission with at most
    PER_ACTOR_IN_FLIGHT blocks per actor (``limit`` in all). Tasks go only to actors that have
    started (model loaded): an actor the cluster cannot place (more GPUs or CPUs asked than exist,
    or nodes still being added) never holds work hostage."""

    def __init__(self, actors: list[Any], limit: int, console: Console) -> None:
        self.actors = actors
        self.limit = limit
        self.console = console
        self.starting = {a.identity.remote(): i for i, a in enumerate(actors)}
        self.capacity: dict[int, int] = {}  # started actor -> free slots
        self.inflight: dict[Any, tuple[BlockTask, int]] = {}  # ref -> (task, actor)

    def admit(self, timeout: float) -> None:
        """Give slots to the actors that have started by now (waiting up to ``timeout`` s)."""
        import ray
        from ray.exceptions import RayError

        if not self.starting:
            return
        ready, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=timeout)
        for ref in ready:
            i = self.starting.pop(ref)
            try:
                ray.get(ref)
                self.capacity[i] = PER_ACTOR_IN_FLIGHT
            except RayError as err:
                self.console.print(f"worker {i} failed to start: {_error_text(err)}", highlight=False)

    def submit(self, queue: collections.deque[BlockTask], attempts: collections.Counter) -> None:
        """Send queued tasks to started actors with free slots."""
        for i in list(self.capacity):
            while queue and self.capacity[i] > 0 and len(self.inflight) < self.limit:
                task = queue.popleft()
                attempts[task.key] += 1
                ref = self.actors[i].run_block.remote(task.layer, task.block, list(task.units), attempts[task.key])
                self.inflight[ref] = (task, i)
                self.capacity[i] -= 1

    def next_done(self, timeout: float) -> list[tuple[Any, BlockTask, int]]:
        """(ref, task, actor) of the blocks that finished (at most one), their slots freed."""
        import ray

        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            task, i = self.inflight.pop(ref)
            if i in self.capacity:
                self.capacity[i] += 1
            out.append((ref, task, i))
        return out

    def retire(self, i: int) -> None:
        """An actor that died for good gets no more work."""
        self.capacity.pop(i, None)

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


class CommitBuffer:
    """Manifest rows of finished blocks, committed every ``commit_every`` blocks (and at the end)."""

    def __init__(self, url: str, commit_every: int) -> None:
        self.url = url
        self.commit_every = commit_every
        self.rows: list[dict[str, Any]] = []
        self.blocks = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        self.blocks += 1

    def due(self) -> bool:
        return self.blocks >= self.commit_every

    def flush(self) -> None:
        if self.rows:
            commit(self.url, self.rows)
            self.rows, self.blocks = [], 0


def _dispatch(job: JobSpec, doc: dict[str, Any], url: str, plan: StorePlan, todo: list[BlockTask],
              summary: SweepSummary, console: Console, address: str | None, num_cpus: int | None) -> None:
    """Run ``todo`` on resident actors: retry a failing block up to ``max_attempts``, then record
    it as failed; on Ctrl-C commit what finished and stop."""
    import ray
    from ray.exceptions import ActorDiedError, RayActorError, RayError, RayTaskError

    from ldam_sweep.cluster.worker import SweepWorker

    started = _init_ray(address, num_cpus)
    res = job.resources
    gpus = res.gpus_per_actor
    if gpus == "auto":
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    actor_cls = ray.remote(SweepWorker).options(
        num_cpus=res.cpus_per_actor, num_gpus=gpus, max_restarts=-1, max_task_retries=0, scheduling_strategy="SPREAD",
    )
    actors = [actor_cls.remote(doc, url, max(1, int(res.cpus_per_actor))) for _ in range(res.actors)]
    pool = WorkerPool(actors, res.max_in_flight or PER_ACTOR_IN_FLIGHT * len(actors), console)
    buffer = CommitBuffer(url, res.commit_every)
    queue = collections.deque(todo)
    attempts: collections.Counter = collections.Counter()
    progress = SweepProgress(sum(len(t.units) for t in todo), console)
    spec_hash = plan.spec_hash()
    t0 = time.perf_counter()
    workers: set[str] = set()

    def retry_or_fail(task: BlockTask, error: str) -> None:
        if attempts[task.key] < res.max_attempts:
            queue.append(task)
            return
        buffer.add(failed_rows(plan.layer(task.layer), task.block, error, attempt=attempts[task.key], spec_hash=spec_hash))
        summary.failed_blocks += 1
        summary.units_failed += len(task.units)
        progress.update(failed=len(task.units))

    try:
        while queue or pool.inflight:
            pool.admit(0)
            while not pool.capacity and not pool.inflight and pool.starting:
                console.print(f"waiting for workers to start ({len(pool.starting)} asked: {res.cpus_per_actor} CPU, "
                              f"{gpus} GPU each) ...", highlight=False)
                pool.admit(60.0)
            pool.submit(queue, attempts)
            if not pool.inflight:
                raise LdamError(f"no worker could start or every worker died for good; {len(queue)} blocks were not run. "
                                "What was committed stays committed: rerun the same command to resume.")
            for ref, task, i in pool.next_done(timeout=30.0):
                try:
                    rows = ray.get(ref)
                except RayTaskError as err:  # an exception inside run_block
                    retry_or_fail(task, _error_text(err))
                    continue
                except RayActorError as err:  # the worker process died (killed, OOM-killed, node lost)
                    if isinstance(err, ActorDiedError) and not _restartable(err):
                        pool.retire(i)
                    retry_or_fail(task, f"worker died: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
                    continue
                except RayError as err:  # lost objects, crashed worker processes, Ray's memory monitor
                    retry_or_fail(task, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
                    continue
                buffer.add(rows)
                workers.add(rows[0]["worker"])
                summary.done_blocks += 1
                summary.units_done += len(rows)
                progress.update(done=len(rows))
            if buffer.due() or (buffer.rows and not pool.inflight):
                buffer.flush()
    except KeyboardInterrupt:
        summary.interrupted = True
        console.print("interrupted: committing finished blocks and stopping workers", highlight=False)
    finally:
        buffer.flush()
        progress.close()
        summary.seconds = time.perf_counter() - t0
        summary.workers = sorted(workers)
        pool.kill()
        if started:
            ray.shutdown()


def _restartable(err: Exception) -> bool:
    return "restart" in str(err).lower() and "will not" not in str(err).lower()


def _error_text(err: Exception) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return "".join(traceback.format_exception_only(type(cause), cause)).strip()
    return str(err).strip().splitlines()[-1]


def summary_line(summary: SweepSummary) -> str:
    return "summary " + json.dumps(summary.as_dict())
