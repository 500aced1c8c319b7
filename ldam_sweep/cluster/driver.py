"""The driver: stage 1 (discriminator, once), then (layer, block) tasks dispatched to resident Ray
actors with a bounded number in flight, manifest rows committed in batches.

Crash semantics: a block counts as done only when its rows are committed; rerunning the same
command resumes from the manifest. Ray may run a block twice (actor restarts); that is harmless
(deterministic chains, whole-object overwrites, readers de-duplicate). A block that fails
``max_attempts`` times gets 'failed' rows with its error and the sweep goes on.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from rich.console import Console
from rich.text import Text

from ldam_sweep.cluster.progress import SweepProgress
from ldam_sweep.errors import (LdamError, RayStartError, StorageStopError, StoreDamagedError, StoreError,
                               StoreReplacedError)
from ldam_sweep.planning import (BlockTask, StorePlan, block_tasks, check_block_memory, pack_batch, store_url,
                                 sweep_store_plan)
from ldam_sweep.spec import JobSpec, load_spec, parse_job
from ldam_sweep.store import commit, create_store, failed_rows, open_store
from ldam_sweep.store.layout import as_stored, check_store, committed_unit_count, read_generation, write_discriminator
from ldam_sweep.store.lease import StoreLease
from ldam_sweep.store.location import StoreLocation, check_writable

# Tasks (batches) in flight per actor, and the threads of its actor: one batch samples while the
# other is written, so the device idles only when writing is slower than sampling. It also bounds
# the worker's host memory (at most this many batches per actor exist at once).
PER_ACTOR_IN_FLIGHT = 2
# Storage errors that a retry cannot fix: the sweep stops instead of trying every block again.
PERSISTENT_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


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
    confirm_fresh: Callable[[str, int], bool] | None = None,
    realism: bool = True,
) -> SweepSummary:
    """Run (or resume) a whole sweep. Local Ray by default; ``address`` joins an existing cluster.

    The driver holds the store's lease from before it touches the store until it returns
    (StoreOwnedError while another driver holds it). ``fresh`` deletes the store and starts over;
    when the store has committed units, ``confirm_fresh(url, units)`` must say yes first
    (the CLI's ``--yes`` or typed confirmation; None: the caller already asked). ``realism``: measure
    the samples' realism after stage 2 (stage 3; when the job has data and the stored record is not current)."""
    from ldam_sweep.model import load_model

    entered = time.perf_counter()
    console = console or Console(stderr=True)
    job, doc = _job_doc(spec)
    url = store_url(job, store)
    # everything that can be wrong with the spec fails here, before any work
    check_writable(url)
    model = load_model(job.model, device="cpu", log=lambda m: console.print(Text(m, style="dim")))
    loc = StoreLocation.parse(url)
    plan = sweep_store_plan(job, model, doc)
    plan = plan if fresh else as_stored(loc, plan)  # a store made before chain starts were kept resumes without them
    check_block_memory(plan)
    check_stage_inputs(job, model)
    tasks = block_tasks(plan)
    try:
        state = check_store(loc, plan, fresh=fresh)
        lease = StoreLease.acquire(loc, doing="--fresh" if fresh else "this run",
                                   log=lambda m: console.print(m, highlight=False, markup=False))
    except OSError as err:  # a full disk, permissions, missing bucket, unreachable endpoint
        raise storage_stop(err, "taking the store's lease") or StoreError(
            f"cannot create the store at {url!r}: {type(err).__name__}: {err}") from None
    try:
        lease.start_heartbeat()
        if fresh and state != "absent":
            _confirm_fresh(loc, confirm_fresh)
        try:
            create_store(loc.url, plan, fresh=fresh)
        except OSError as err:
            raise storage_stop(err, "creating the store") or StoreError(
                f"cannot create the store at {url!r}: {type(err).__name__}: {err}") from None
        lease.set_generation(read_generation(loc) or "")
        if state == "same" and not fresh:
            _check_files(loc)
        console.print(f"store {loc.url}: {len(plan.layers)} layers, {sum(lp.planned_units() for lp in plan.layers)} "
                      f"units, {len(tasks)} blocks", highlight=False, markup=False)

        st = open_store(loc.url)
        d_acc = _stage1(job, model, st, loc.url, console)
        committed = st.refresh().units(status=("ok", "dead"))  # dead units are done: not sampled again
        done_keys = {(r["layer"], r["block"]) for r in committed.select(["layer", "block"]).to_pylist()}
        todo = [t for t in tasks if t.key not in done_keys]
        console.print(f"resume: {len(tasks) - len(todo)} of {len(tasks)} blocks already committed, {len(todo)} to run",
                      highlight=False, markup=False)
        summary = SweepSummary(store=loc.url, planned_blocks=len(tasks), skipped_blocks=len(tasks) - len(todo),
                               done_blocks=0, failed_blocks=0, units_done=0, units_failed=0, seconds=0.0,
                               discriminator_accuracy=d_acc)
        summary.startup["driver_s"] = time.perf_counter() - entered
        if todo:
            _dispatch(job, doc, loc.url, plan, todo, summary, console, address, num_cpus, lease)
        if realism and job.data is not None and not summary.interrupted:
            lease.check(read_generation(loc))
            summary.realism = _stage3(loc.url, console)
        return summary
    except OSError as err:  # a full disk anywhere (stage 1 included): exit 4, not a traceback or exit 2
        stop = storage_stop(err, "writing to the store")
        if stop is None:
            raise
        raise stop from None
    finally:
        lease.release()


def _confirm_fresh(loc: StoreLocation, confirm: Callable[[str, int], bool] | None) -> None:
    """--fresh deletes committed work only when asked twice; an empty or unfinished store needs no yes."""
    try:
        units = committed_unit_count(loc)
    except StoreError:
        units = -1  # an unreadable manifest: there may be committed work
    if units == 0 or confirm is None:
        return
    what = f"{units} committed units" if units > 0 else "committed units (its manifest cannot be read)"
    if not confirm(loc.url, units):
        raise StoreError(f"--fresh would delete {what} of store {loc.url!r}; nothing was deleted. "
                         "Pass --fresh --yes to delete them, or use another --store path.")


def _stage1(job: JobSpec, model: Any, st: Any, url: str, console: Console) -> float | None:
    """Train or load the discriminator once and keep it in the store; a resumed sweep reuses it once
    its bytes match the checksum its record names. One that is incomplete (a stage 1 cut short) or
    damaged is made again, and must be the one the committed blocks were sampled with."""
    if job.discriminator is None:
        return None
    say = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731
    state, why = st.discriminator_state()
    if state == "legacy" and not _legacy_discriminator_intact(st, model):
        state, why = "corrupt", "its weights do not match the digest its record names"
    if state in ("ok", "legacy"):
        info = st.discriminator_info()
        say(f"stage 1: discriminator already in the store (held-out accuracy {info['heldout_accuracy']:.3f})")
        return float(info["heldout_accuracy"])
    if state != "absent":
        say(f"stage 1: the stored discriminator is {state} ({why}); making it again")
    from ldam_sweep.model.loading import default_device
    from ldam_sweep.stage import discriminator_record, job_discriminator

    used = {d for d in st.units(status=("ok", "dead"))["discriminator"].to_pylist() if d}
    model.to(default_device())
    t0 = time.perf_counter()
    what = "loading" if job.discriminator.file is not None else "training"
    say(f"stage 1: {what} the discriminator on {model.device} ...")
    last = [time.perf_counter()]

    def report(i: int, stats: dict) -> None:
        if time.perf_counter() - last[0] > 10:
            last[0] = time.perf_counter()
            say(f"  D update {i}: loss {stats['loss']:.3f}, batch accuracy {stats['accuracy']:.2f}")

    trained = job_discriminator(job, model, progress=report)
    model.to("cpu")
    assert trained is not None
    if used and used != {trained.digest()}:
        raise StoreDamagedError(
            f"stage 1: the discriminator made again (digest {trained.digest()[:12]}) is not the one the committed "
            f"units of {url!r} were sampled with ({', '.join(sorted(d[:12] for d in used))}): training on another "
            "machine, thread count or library version gives other weights. The store cannot be completed "
            f"consistently: start it over with `ldam-sweep run SPEC --store {url} --fresh`, or use it as it is.")
    try:
        write_discriminator(url, trained.to_bytes(), discriminator_record(trained))
    except OSError as err:
        raise storage_stop(err, "writing the discriminator (stage 1)") or err from None
    say(f"stage 1: held-out accuracy {trained.heldout_accuracy:.3f} (real {trained.heldout_real_accuracy:.3f}, "
        f"fresh chains {trained.heldout_fake_accuracy:.3f}) in {time.perf_counter() - t0:.0f}s")
    return trained.heldout_accuracy


def _legacy_discriminator_intact(st: Any, model: Any) -> bool:
    """A discriminator stored before its bytes had a checksum: its weights match its record's digest."""
    import warnings

    from ldam_sweep.sampling.discriminator import load_discriminator

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_discriminator(st.discriminator_bytes(), model).digest() == st.discriminator_info().get("digest")
    except LdamError:
        return False


def _check_files(loc: StoreLocation) -> None:
    """Before a run resumes a store: its metadata and manifest parts are intact (``verify`` checks
    the same); the discriminator is stage 1's, the realism record stage 3's to check and redo."""
    from ldam_sweep.store.verify import file_problems

    problems = [p for p in file_problems(loc)[0] if p.kind not in ("discriminator", "realism", "lease", "verify-record")]
    if problems:
        raise StoreDamagedError(f"store {loc.url!r} is damaged: {problems[0]}" + (
            f" (and {len(problems) - 1} more: `ldam-sweep verify {loc.url}` lists them)" if len(problems) > 1 else ""))


WORKER_NICENESS_ENV = "RAY_worker_niceness"


def _stage3(url: str, console: Console) -> dict[str, Any] | None:
    """Measure the samples' realism (``ldam_sweep.realism``) unless the stored record is current."""
    from ldam_sweep.realism import layer_line, measure_realism
    from ldam_sweep.store.realism import write_realism

    st = open_store(url)
    doc = st.realism()
    measured = [r["name"] for r in st.layers() if r["done"] - r["dead"] > 0]
    if doc and measured and all(doc["current"].get(name) for name in measured):
        console.print("stage 3: realism already measured for every committed unit", highlight=False, markup=False)
    else:
        console.print("stage 3: realism of the samples (two-sample test: 0.5 = indistinguishable from the real data; "
                      "HF: fine detail / the real data's; the units' exemplars in brackets) ...",
                      highlight=False, markup=False)

        def report(name: str, e: dict[str, Any]) -> None:
            console.print("  " + layer_line(name, e), highlight=False, markup=False)

        try:
            doc = measure_realism(st, progress=report)
            write_realism(st.loc, doc)
        except OSError as err:
            raise storage_stop(err, "writing the realism record") or err
        except (LdamError, ValueError) as err:
            console.print(f"stage 3: realism not measured: {err}", highlight=False, markup=False)
            return None
    pooled = (doc or {}).get("pooled") or {}
    return {"c2st": pooled.get("c2st"), "c2st_exemplars": pooled.get("c2st_exemplars"),
            "hf_ratio": pooled.get("hf_ratio"), "seconds": (doc or {}).get("seconds")}


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"namespace": "ldam-sweep", "log_to_driver": False}
    # Ray starts its workers at nice 15 so that its own daemons stay responsive; here the workers
    # are the sweep, and beside any other busy process (a second job, a build) nice 15 starves
    # them: two actors took 69 s instead of 3 s to start beside two CPU hogs on 2 cores. A local
    # Ray started here runs them at normal priority (the raylet reads this at start; a value the
    # user set wins). A cluster started with `ray start` takes it from that command's environment.
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)
    except Exception as err:  # ray.init raises many types: ConnectionError, OSError (socket paths), RuntimeError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RayStartError(f"cannot start or join Ray (address {address or 'local'!r}): {type(err).__name__}: "
                            f"{first}. Committed work is kept; fix this and rerun the same command.") from None
    return True


class WorkerPool:
    """The resident actors: admission of the started ones, and submission with at most
    PER_ACTOR_IN_FLIGHT batches per actor (``limit`` in all). A batch is as many whole blocks of one
    layer as the actor said it samples at once (its ``batch_units``). Tasks go only to actors that
    have started (model loaded): an actor the cluster cannot place (more GPUs or CPUs asked than
    exist, or nodes still being added) never holds work hostage."""

    def __init__(self, actors: list[Any], limit: int, console: Console) -> None:
        self.actors = actors
        self.limit = limit
        self.console = console
        self.starting = {a.identity.remote(): i for i, a in enumerate(actors)}
        self.capacity: dict[int, int] = {}  # started actor -> free slots
        self.batch_units: dict[int, dict[str, int]] = {}  # started actor -> units per batch, by layer
        self.niceness: dict[int, int] = {}  # started actor -> its process's nice value
        self.inflight: dict[Any, tuple[list[BlockTask], int]] = {}  # ref -> (blocks, actor)
        self.asked = time.perf_counter()
        self.first_ready: dict[str, Any] = {}  # the first started actor's start-up, for the summary

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
                ident = ray.get(ref)
                if not self.first_ready:
                    self.first_ready = {"first_worker_s": time.perf_counter() - self.asked, "worker": ident["startup"]}
                self.batch_units[i] = ident["batch_units"]
                self.capacity[i] = PER_ACTOR_IN_FLIGHT
                nice = ident["niceness"]
                if nice > 0 and nice not in self.niceness.values():  # once per nice value, not per actor
                    self.console.print(
                        f"note: worker {i} runs at nice {nice} (Ray's default for workers): beside other "
                        f"busy processes it gets a small share of the CPU. Start the cluster with "
                        f"{WORKER_NICENESS_ENV}=0 in `ray start`'s environment.", highlight=False, markup=False)
                self.niceness[i] = nice
            except RayError as err:
                self.console.print(f"worker {i} failed to start: {_error_text(err)}", highlight=False, markup=False)

    def submit(self, queue: collections.deque[BlockTask], attempts: collections.Counter) -> None:
        """Send queued blocks, packed into batches, to started actors with free slots."""
        for i in list(self.capacity):
            while queue and self.capacity[i] > 0 and len(self.inflight) < self.limit:
                # a retried block goes alone, so a block that keeps failing cannot fail its batch-mates
                retry = attempts[queue[0].key] > 0
                batch = pack_batch(queue, 0 if retry else self.batch_units[i].get(queue[0].layer, 1))
                for task in batch:
                    attempts[task.key] += 1
                ref = self.actors[i].run_batch.remote(batch[0].layer, [(t.block, list(t.units)) for t in batch],
                                                      [attempts[t.key] for t in batch])
                self.inflight[ref] = (batch, i)
                self.capacity[i] -= 1

    def next_done(self, timeout: float) -> list[tuple[Any, list[BlockTask], int]]:
        """(ref, blocks, actor) of the batches that finished (at most one), their slots freed."""
        import ray

        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            batch, i = self.inflight.pop(ref)
            if i in self.capacity:
                self.capacity[i] += 1
            out.append((ref, batch, i))
        return out

    def retire(self, i: int) -> None:
        """An actor that died for good gets no more work."""
        self.capacity.pop(i, None)

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


class CommitBuffer:
    """Manifest rows of finished blocks, committed every ``commit_every`` blocks (and at the end).

    With a lease, every commit first checks that this driver still owns the store and that the
    store is the generation it started with; if not, the rows are dropped (nothing more is
    committed) and StoreReplacedError is raised. Rows are stamped with the generation."""

    def __init__(self, url: str, commit_every: int, lease: StoreLease | None = None) -> None:
        self.url = url
        self.commit_every = commit_every
        self.lease = lease
        self.rows: list[dict[str, Any]] = []
        self.blocks = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        self.blocks += 1

    def due(self) -> bool:
        return self.blocks >= self.commit_every

    def flush(self) -> None:
        if not self.rows:
            return
        if self.lease is not None:
            try:
                self.lease.check(read_generation(self.url))
            except StoreReplacedError:
                self.rows, self.blocks = [], 0
                raise
            generation = self.lease.record.generation or None
            self.rows = [{**r, "generation": generation} for r in self.rows]
        try:
            commit(self.url, self.rows)
        except OSError as err:
            stop = storage_stop(err, f"committing {self.blocks} blocks to the manifest")
            if stop is None:
                raise
            raise stop from None
        self.rows, self.blocks = [], 0


def _dispatch(job: JobSpec, doc: dict[str, Any], url: str, plan: StorePlan, todo: list[BlockTask],
              summary: SweepSummary, console: Console, address: str | None, num_cpus: int | None,
              lease: StoreLease | None = None) -> None:
    """Run ``todo`` on resident actors: retry a failing block up to ``max_attempts``, then record
    it as failed; on Ctrl-C commit what finished and stop."""
    import ray
    from ray.exceptions import ActorDiedError, RayActorError, RayError, RayTaskError

    from ldam_sweep.cluster.worker import SweepWorker

    t_ray = time.perf_counter()
    started = _init_ray(address, num_cpus)
    summary.startup["ray_init_s"] = time.perf_counter() - t_ray
    watch = HeadWatch(lease, started, console)
    watch.start()
    res = job.resources
    gpus = res.gpus_per_actor
    if gpus == "auto":
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    actor_cls = ray.remote(SweepWorker).options(
        num_cpus=res.cpus_per_actor, num_gpus=gpus, max_restarts=-1, max_task_retries=0, scheduling_strategy="SPREAD",
        max_concurrency=PER_ACTOR_IN_FLIGHT,  # threaded: one batch samples while another is written
    )
    generation = None if lease is None else lease.record.generation
    actors = [actor_cls.remote(doc, url, max(1, int(res.cpus_per_actor)), generation) for _ in range(res.actors)]
    pool = WorkerPool(actors, res.max_in_flight or PER_ACTOR_IN_FLIGHT * len(actors), console)
    buffer = CommitBuffer(url, res.commit_every, lease)
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
                              f"{gpus} GPU each) ...", highlight=False, markup=False)
                pool.admit(60.0)
            pool.submit(queue, attempts)
            if not pool.inflight:
                raise LdamError(f"no worker could start or every worker died for good; {len(queue)} blocks were not run. "
                                "What was committed stays committed: rerun the same command to resume.")
            for ref, batch, i in pool.next_done(timeout=30.0):
                try:
                    per_block = ray.get(ref)
                except RayTaskError as err:  # an exception inside run_batch
                    if isinstance(getattr(err, "cause", None), StoreReplacedError):  # the worker saw a new store
                        if lease is not None:
                            lease.check(read_generation(url))  # raises with who owns the store now
                        raise err.cause from None
                    stop = storage_stop(err.cause, f"writing blocks {[t.block for t in batch]} of layer {batch[0].layer!r}")
                    if stop is not None:
                        raise stop from None
                    error = _error_text(err)
                except RayActorError as err:  # the worker process died (killed, OOM-killed, node lost)
                    if isinstance(err, ActorDiedError) and not _restartable(err):
                        pool.retire(i)
                    error = f"worker died: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
                except RayError as err:  # lost objects, crashed worker processes, Ray's memory monitor
                    error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                else:
                    for rows in per_block:
                        buffer.add(rows)
                        workers.add(rows[0]["worker"])
                        summary.done_blocks += 1
                        summary.units_done += len(rows)
                        progress.update(done=len(rows))
                    continue
                for task in batch:
                    retry_or_fail(task, error)
            if buffer.due() or (buffer.rows and not pool.inflight):
                buffer.flush()
    except KeyboardInterrupt:
        summary.interrupted = True
        console.print("interrupted: committing finished blocks and stopping workers (Ctrl-C again: stop at once)",
                      highlight=False, markup=False)
    finally:
        with _ShutdownGuard(summary, console) as guard:
            try:
                buffer.flush()
            except _StopNow:
                pass
            finally:
                guard.committing = False
                progress.close()
                summary.seconds = time.perf_counter() - t0
                summary.workers = sorted(workers)
                summary.worker_niceness = sorted(set(pool.niceness.values()))
                summary.startup.update(pool.first_ready)
                watch.stop()
                pool.kill()
                if started:
                    ray.shutdown()


HEAD_LOST_ENV = "LDAM_SWEEP_HEAD_LOST_AFTER"  # seconds the Ray head may be unreachable (default 10)


class HeadWatch:
    """Watches the Ray head (its GCS) while blocks run. Ray's own client gives up after 60 s without
    the GCS and ends the process from C++ (exit 1, "Failed to connect to GCS", no cleanup). Before
    that, when the GCS has refused connections for ``HEAD_LOST_ENV`` seconds, this thread prints one
    line, releases the lease, stops the Ray processes this driver started, and exits 3: committed
    blocks stay committed and the same command resumes once the cluster is back."""

    def __init__(self, lease: StoreLease | None, started: bool, console: Console) -> None:
        self.lease, self.started, self.console = lease, started, console
        self.after = float(os.environ.get(HEAD_LOST_ENV, 10.0))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import ray

        address = ray.get_runtime_context().gcs_address
        host, _, port = address.rpartition(":")
        self._thread = threading.Thread(target=self._watch, args=(host, int(port)), name="ldam-sweep-head", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, host: str, port: int) -> None:
        import socket

        lost_since = None
        while not self._stop.wait(1.0):
            try:
                socket.create_connection((host, port), timeout=2.0).close()
                lost_since = None
            except OSError:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since >= self.after and not self._stop.is_set():
                    self._head_lost(f"{host}:{port}")
                    return

    def _head_lost(self, address: str) -> None:
        self.console.print(f"error: the Ray head ({address}) stopped answering for {self.after:.0f}s; the sweep stopped. "
                           "Committed blocks are intact: start the cluster again and rerun the same command to resume.",
                           highlight=False, markup=False, soft_wrap=True)
        try:
            if self.lease is not None:
                self.lease.release()
            if self.started:  # the local Ray this driver started: none of its processes outlive it
                import ray

                _kill_local_ray(ray._private.worker._global_node)
        finally:
            os._exit(RayStartError.exit_code)


def _kill_local_ray(node: Any) -> None:
    """SIGKILL the local Ray this driver started: every process the node started and all their
    descendants (Ray's agents and workers rename themselves, so they are found by parentage)."""
    if node is None:
        return
    roots = {info.process.pid for infos in node.all_processes.values() for info in infos if info.process is not None}
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    todo, found = list(roots), set()
    while todo:
        pid = todo.pop()
        if pid not in found and pid != os.getpid():
            found.add(pid)
            todo += children.get(pid, [])
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class _StopNow(BaseException):
    """Raised by the second Ctrl-C while the driver commits: skip the rest of the commit."""


class _ShutdownGuard:
    """While the driver commits and stops Ray: a Ctrl-C skips what is left of the commit (those
    blocks rerun on the next run) but never interrupts the Ray shutdown, so no Ray process outlives
    the driver. The sweep then ends as interrupted (exit 130)."""

    def __init__(self, summary: SweepSummary, console: Console) -> None:
        self.summary, self.console = summary, console
        self.previous: Any = None
        self.committing = True
        self.interrupts = 0

    def _handler(self, signum: int, frame: Any) -> None:
        self.summary.interrupted = True
        self.interrupts += 1
        if self.interrupts == 1:
            self.console.print("interrupted: stopping now without committing the finished blocks (they rerun "
                               "next time); shutting Ray down", highlight=False, markup=False)
        if self.committing:
            self.committing = False
            raise _StopNow

    def __enter__(self) -> "_ShutdownGuard":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def storage_stop(err: BaseException | None, doing: str) -> StorageStopError | None:
    """A StorageStopError when ``err`` is a storage error no retry can fix (disk full, quota,
    read-only, permission), else None."""
    if not isinstance(err, OSError) or err.errno not in PERSISTENT_STORAGE_ERRNOS:
        return None
    reason = os.strerror(err.errno) if err.errno else type(err).__name__
    where = f" ({err.filename})" if err.filename else ""
    return StorageStopError(f"the sweep stopped: {reason}{where} while {doing}. Committed blocks are intact; free "
                            "space or fix the store's permissions, then rerun the same command to resume.")


def check_stage_inputs(job: JobSpec, model: Any) -> None:
    """Every file the spec names loads (the model's weights already did): the discriminator file
    (weights_only=True, fits the model) and a folder or .npy data source, before any store exists."""
    if job.discriminator is not None and job.discriminator.file is not None:
        import warnings

        from ldam_sweep.sampling.discriminator import load_discriminator

        with warnings.catch_warnings():  # a fingerprint warning comes once, from stage 1
            warnings.simplefilter("ignore")
            load_discriminator(job.discriminator.file, model)
    if job.data is not None and job.data.source in ("folder", "npy"):
        from ldam_sweep.data import real_images

        real_images(job.data, model.input, "train")


def _restartable(err: Exception) -> bool:
    return "restart" in str(err).lower() and "will not" not in str(err).lower()


def _error_text(err: Exception) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return "".join(traceback.format_exception_only(type(cause), cause)).strip()
    return str(err).strip().splitlines()[-1]


def summary_line(summary: SweepSummary) -> str:
    return "summary " + json.dumps(summary.as_dict())
