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

from ldam_sweep.cluster.plan import BlockTask, block_tasks, check_writable, store_url, sweep_store_plan
from ldam_sweep.cluster.progress import SweepProgress
from ldam_sweep.errors import LdamError
from ldam_sweep.spec import JobSpec, load_spec, parse_job
from ldam_sweep.store import commit, create_store, failed_rows, open_store
from ldam_sweep.store.layout import StoreError, write_discriminator

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
    committed = st.refresh().units(status="ok")
    done_keys = {(r["layer"], r["block"]) for r in committed.select(["layer", "block"]).to_pylist()}
    todo = [t for t in tasks if t.key not in done_keys]
    console.print(f"resume: {len(tasks) - len(todo)} of {len(tasks)} blocks already committed, {len(todo)} to run",
                  highlight=False)
    summary = SweepSummary(store=loc.url, planned_blocks=len(tasks), skipped_blocks=len(tasks) - len(todo),
                           done_blocks=0, failed_blocks=0, units_done=0, units_failed=0, seconds=0.0,
                           discriminator_accuracy=d_acc)
    if not todo:
        return summary
    _dispatch(job, doc, loc.url, todo, plan.spec_hash(), summary, console, address, num_cpus)
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
    from ldam_sweep.stage import job_discriminator

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
    write_discriminator(url, trained)
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


def _dispatch(job: JobSpec, doc: dict[str, Any], url: str, todo: list[BlockTask], spec_hash: str,
              summary: SweepSummary, console: Console, address: str | None, num_cpus: int | None) -> None:
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
    # Tasks go only to actors that have started (model loaded): an actor the cluster cannot place
    # (more GPUs or CPUs asked than exist, or nodes still being added) never holds work hostage.
    starting = {a.identity.remote(): i for i, a in enumerate(actors)}
    capacity: dict[int, int] = {}

    def admit(timeout: float) -> None:
        if not starting:
            return
        ready, _ = ray.wait(list(starting), num_returns=len(starting), timeout=timeout)
        for ref in ready:
            i = starting.pop(ref)
            try:
                ray.get(ref)
                capacity[i] = PER_ACTOR_IN_FLIGHT
            except RayError as err:
                console.print(f"worker {i} failed to start: {_error_text(err)}", highlight=False)
    limit = res.max_in_flight or PER_ACTOR_IN_FLIGHT * len(actors)
    queue = collections.deque(todo)
    attempts: dict[tuple[str, int], int] = collections.Counter()
    inflight: dict[Any, tuple[BlockTask, int]] = {}
    buffer: list[dict[str, Any]] = []
    buffered_blocks = 0
    progress = SweepProgress(sum(len(t.units) for t in todo), console)
    lp_by_name = {lp.name: lp for lp in open_store(url).plan.layers}
    t0 = time.perf_counter()
    workers: set[str] = set()

    def flush() -> None:
        nonlocal buffer, buffered_blocks
        if buffer:
            commit(url, buffer)
            buffer, buffered_blocks = [], 0

    def retry_or_fail(task: BlockTask, error: str) -> None:
        nonlocal buffered_blocks
        if attempts[task.key] < res.max_attempts:
            queue.append(task)
            return
        buffer.extend(failed_rows(lp_by_name[task.layer], task.block, error, attempt=attempts[task.key], spec_hash=spec_hash))
        buffered_blocks += 1
        summary.failed_blocks += 1
        summary.units_failed += len(task.units)
        progress.update(failed=len(task.units))

    try:
        while queue or inflight:
            admit(0)
            while not capacity and not inflight and starting:
                console.print(f"waiting for workers to start ({len(starting)} asked: {res.cpus_per_actor} CPU, "
                              f"{gpus} GPU each) ...", highlight=False)
                admit(60.0)
            for i in list(capacity):
                while queue and capacity[i] > 0 and len(inflight) < limit:
                    task = queue.popleft()
                    attempts[task.key] += 1
                    ref = actors[i].run_block.remote(task.layer, task.block, list(task.units), attempts[task.key])
                    inflight[ref] = (task, i)
                    capacity[i] -= 1
            if not inflight:
                raise LdamError(f"no worker could start or every worker died for good; {len(queue)} blocks were not run. "
                                "What was committed stays committed: rerun the same command to resume.")
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=30.0)
            for ref in ready:
                task, i = inflight.pop(ref)
                if i in capacity:
                    capacity[i] += 1
                try:
                    rows = ray.get(ref)
                except RayTaskError as err:  # an exception inside run_block
                    retry_or_fail(task, _error_text(err))
                    continue
                except RayActorError as err:  # the worker process died (killed, OOM-killed, node lost)
                    if isinstance(err, ActorDiedError) and not _restartable(err):
                        capacity.pop(i, None)
                    retry_or_fail(task, f"worker died: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
                    continue
                except RayError as err:  # lost objects, crashed worker processes, Ray's memory monitor
                    retry_or_fail(task, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
                    continue
                buffer.extend(rows)
                buffered_blocks += 1
                workers.add(rows[0]["worker"])
                summary.done_blocks += 1
                summary.units_done += len(rows)
                progress.update(done=len(rows))
            if buffered_blocks >= res.commit_every or (buffer and not inflight):
                flush()
    except KeyboardInterrupt:
        summary.interrupted = True
        console.print("interrupted: committing finished blocks and stopping workers", highlight=False)
    finally:
        flush()
        progress.close()
        summary.seconds = time.perf_counter() - t0
        summary.workers = sorted(workers)
        for a in actors:
            ray.kill(a)
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
