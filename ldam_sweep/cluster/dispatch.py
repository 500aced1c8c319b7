"""Stage 2, the blocks: (layer, block) tasks dispatched to resident Ray actors with a bounded
number in flight, their manifest rows committed in batches; every step reported as an event."""

from __future__ import annotations

import collections
import time
from typing import Any

from rich.console import Console

from ldam_sweep.cluster.commit import CommitBuffer, storage_stop
from ldam_sweep.cluster.events import SweepCallback, SweepSummary
from ldam_sweep.cluster.runtime import PER_ACTOR_IN_FLIGHT, HeadWatch, WorkerPool, error_text, init_ray
from ldam_sweep.cluster.signals import StopSignals
from ldam_sweep.errors import NoWorkersError, StorageStopError, StoreReplacedError
from ldam_sweep.planning import BlockTask, SweepPlan
from ldam_sweep.store import failed_rows
from ldam_sweep.store.layout import read_generation
from ldam_sweep.store.lease import StoreLease
from ldam_sweep.store.location import StoreLocation
from ldam_sweep.store.transport import StoreIO

GROW_EVERY_S = 10.0  # actors: auto -- how often the cluster's resources are looked at (nodes that joined)


class ModuleHolder:
    """Holds the caller's own nn.Module (``run_sweep(model=module)``), pickled, on the driver's node;
    every actor asks it for the module when it starts, and again when Ray restarts it. The actors'
    constructor gets only this holder's name: a module (or any reference, even an actor handle)
    passed as a constructor argument is a dependency in Ray's object store, which an actor restart may
    not find any more (Ray logs an error about exactly that, ray-project/ray#53727). No torch is
    imported here: it keeps bytes."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def get(self) -> bytes:
        return self.blob


def module_holder(module: Any, generation: str | None) -> tuple[str, Any]:
    """(its name, the handle) of a ModuleHolder actor for ``module`` on this (the driver's) node, using
    no CPU, named after the store's generation; the driver keeps the handle, which keeps it alive."""
    import uuid

    import ray
    from ray import cloudpickle
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"ldam-sweep-module-{generation or uuid.uuid4().hex}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handle = ray.remote(ModuleHolder).options(name=name, num_cpus=0, max_restarts=0, scheduling_strategy=here).remote(
        cloudpickle.dumps(module))
    return name, handle


class Dispatch:
    """Runs ``todo`` on resident actors: retries a failing block up to ``max_attempts``, then records
    it as failed; on Ctrl-C or SIGTERM commits what finished and stops (a second signal: at once)."""

    def __init__(self, plan: SweepPlan, loc: StoreLocation, todo: list[BlockTask], summary: SweepSummary,
                 console: Console, lease: StoreLease | None, events: SweepCallback,
                 signals: StopSignals | None = None, io: StoreIO | None = None) -> None:
        self.plan, self.job, self.loc = plan, plan.job, loc
        self.summary, self.console, self.lease, self.events = summary, console, lease, events
        self.signals = signals or StopSignals()
        self.io = io or StoreIO(loc.url, plan.job.resources.storage_patience)
        self.storage_down = False  # the store stopped answering for good: nothing more is written
        self.module: Any = None  # the caller's own nn.Module (run_sweep(model=...)): shipped to every actor
        self.holder: Any = None  # the ModuleHolder actor that keeps it (its handle keeps it alive)
        self.queue = collections.deque(todo)
        self.attempts: collections.Counter = collections.Counter()
        self.buffer = CommitBuffer(loc.url, plan.job.resources.commit_every, lease, on_commit=events.on_commit,
                                   io=self.io)
        self.spec_hash = plan.store.spec_hash()
        self.generation = None if lease is None else lease.record.generation  # the store the workers write into
        events.on_start(summary, todo)

    def run(self, address: str | None, num_cpus: int | None) -> None:
        """Start or join Ray, run the blocks, then -- always, outside the signals' armed region --
        commit what finished, stop the workers and the Ray this call started."""
        import ray

        pool: WorkerPool | None = None
        watch: HeadWatch | None = None
        owns = not ray.is_initialized()  # this call starts or joins Ray: it shuts it down at the end
        t0 = time.perf_counter()
        try:
            with self.signals.armed():
                t_ray = time.perf_counter()
                init_ray(address, num_cpus)
                self.signals.install()  # ray.init put its own SIGTERM handler in place of ours
                self.summary.startup["ray_init_s"] = time.perf_counter() - t_ray
                watch = HeadWatch(self.lease, owns, self.console)
                watch.start()
                pool, t0 = self._pool(), time.perf_counter()
                self._loop(pool)
        except StorageStopError:
            self.storage_down = True  # the final commit would only wait for the store again
            raise
        except KeyboardInterrupt:  # Interrupted, or the plain KeyboardInterrupt Ray turns it into inside ray.wait
            self.summary.interrupted, self.summary.signal = True, self.signals.name
            ctrl_c = self.signals.name == "SIGINT"
            self.console.print(f"{'interrupted' if ctrl_c else self.signals.name}: committing finished blocks and "
                               f"stopping workers ({'Ctrl-C' if ctrl_c else 'the signal'} again: stop at once)",
                               highlight=False, markup=False)
        finally:
            self._finish(pool, watch, owns, t0)

    def _finish(self, pool: WorkerPool | None, watch: HeadWatch | None, owns: bool, t0: float) -> None:
        """Commit what finished (a second signal skips it), report, stop the workers and Ray."""
        import ray

        try:
            if not self.storage_down and not self.buffer.flush(self.signals.finish):
                self.summary.interrupted = True
        finally:
            if self.signals.stopping:
                self.summary.interrupted = True
                self.summary.signal = self.summary.signal or self.signals.name
            self.events.on_blocks_end(self.summary)
            self.summary.seconds = time.perf_counter() - t0
            if pool is not None:
                self.summary.worker_niceness = sorted(set(pool.niceness.values()))
                self.summary.startup.update(pool.first_ready)
            if watch is not None:
                watch.stop()
            if pool is not None:
                pool.kill()
            if owns and ray.is_initialized():
                ray.shutdown()

    def _pool(self) -> WorkerPool:
        import ray

        from ldam_sweep.cluster.worker import SweepWorker

        res = self.job.resources
        self.gpus = res.gpus_per_actor
        if self.gpus == "auto":
            self.gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        actor_cls = ray.remote(SweepWorker).options(
            num_cpus=res.cpus_per_actor, num_gpus=self.gpus, max_restarts=-1, max_task_retries=0,
            scheduling_strategy="SPREAD", max_concurrency=PER_ACTOR_IN_FLIGHT,  # one batch samples, one is written
        )
        module = None
        if self.module is not None:  # one copy, asked for by each actor by name
            module, self.holder = module_holder(self.module, self.generation)
        make = lambda: actor_cls.remote(self.plan, self.loc.url, max(1, int(res.cpus_per_actor)), self.generation,  # noqa: E731
                                        module)
        count = self._actor_target() if res.actors == "auto" else res.actors
        self.grown_at = time.monotonic()
        return WorkerPool([make() for _ in range(count)], res.max_in_flight, self.console, make=make)

    def _actor_target(self) -> int:
        """``actors: auto``: as many actors as the cluster's resources fit now (one per GPU share when
        actors take GPUs, else one per cpus_per_actor CPUs), at least one."""
        import ray

        total = ray.cluster_resources()
        if self.gpus:
            return max(1, int(total.get("GPU", 0) // self.gpus))
        return max(1, int(total.get("CPU", 0) // self.job.resources.cpus_per_actor))

    def _grow(self, pool: WorkerPool) -> None:
        """``actors: auto``: nodes that joined since the last look get actors (every GROW_EVERY_S)."""
        if self.job.resources.actors != "auto" or time.monotonic() - self.grown_at < GROW_EVERY_S:
            return
        self.grown_at = time.monotonic()
        added = pool.grow(self._actor_target())
        if added:
            self.console.print(f"the cluster grew: {added} more worker(s) asked for ({len(pool.actors) - len(pool.dead)} "
                               "in all)", highlight=False, markup=False)

    def _loop(self, pool: WorkerPool) -> None:
        res = self.job.resources
        while self.queue or pool.inflight:
            self._grow(pool)
            pool.admit(0)
            while not pool.capacity and not pool.inflight and pool.starting:
                self.console.print(f"waiting for workers to start ({len(pool.starting)} asked: {res.cpus_per_actor} "
                                   f"CPU, {self.gpus} GPU each) ...", highlight=False, markup=False)
                pool.admit(60.0)
                self._grow(pool)
            pool.submit(self.queue, self.attempts, lambda batch, i: self.events.on_block_start(
                batch, i, [self.attempts[t.key] for t in batch]))
            if not pool.inflight:
                raise NoWorkersError(
                    f"no worker can run: all {len(pool.actors)} failed to start or died for good (their errors are "
                    f"above); {len(self.queue)} blocks were not run. What was committed stays committed: fix the "
                    "cause and rerun the same command to resume.")
            for ref, batch, i in pool.next_done(timeout=GROW_EVERY_S):
                self._collect(pool, ref, batch, i)
            if self.buffer.due() or (self.buffer.rows and not pool.inflight):
                self.buffer.flush()

    def _collect(self, pool: WorkerPool, ref: Any, batch: list[BlockTask], i: int) -> None:
        """A finished batch: its blocks' rows into the commit buffer, or each block retried or failed."""
        import ray
        from ray.exceptions import RayActorError, RayError, RayTaskError

        try:
            per_block = ray.get(ref)
        except RayTaskError as err:  # an exception inside run_batch
            if isinstance(getattr(err, "cause", None), StoreReplacedError):  # the worker saw a new store
                if self.lease is not None:
                    self.lease.check(read_generation(self.loc))  # raises with who owns the store now
                raise err.cause from None
            stop = storage_stop(err.cause, f"writing blocks {[t.block for t in batch]} of layer {batch[0].layer!r}")
            if stop is not None:
                raise stop from None
            error = error_text(err)
        except RayActorError as err:  # the worker process died (killed, OOM-killed, node lost)
            pool.lost(i)
            error = f"worker died: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
        except RayError as err:  # lost objects, crashed worker processes, Ray's memory monitor
            error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        else:
            for task, rows in zip(batch, per_block):
                self.buffer.add(rows)
                self.events.on_block_done(task, rows)
            return
        for task in batch:
            self._retry_or_fail(task, error)

    def _retry_or_fail(self, task: BlockTask, error: str) -> None:
        final = self.attempts[task.key] >= self.job.resources.max_attempts
        if final:
            self.buffer.add(failed_rows(self.plan.store.layer(task.layer), task.block, error, attempt=self.attempts[task.key],
                                        spec_hash=self.spec_hash, generation=self.generation))
        else:
            self.queue.append(task)
        self.events.on_block_failed(task, error, final)
