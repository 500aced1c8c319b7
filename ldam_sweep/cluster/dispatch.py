"""Stage 2, the blocks: (layer, block) tasks dispatched to resident Ray actors with a bounded
number in flight, their manifest rows committed in batches; every step reported as an event."""

from __future__ import annotations

import collections
import time
from typing import Any

from rich.console import Console

from ldam_sweep.cluster.commit import CommitBuffer, ShutdownGuard, StopNow, storage_stop
from ldam_sweep.cluster.events import SweepCallback, SweepSummary
from ldam_sweep.cluster.runtime import PER_ACTOR_IN_FLIGHT, HeadWatch, WorkerPool, error_text, init_ray
from ldam_sweep.errors import LdamError, StoreReplacedError
from ldam_sweep.planning import BlockTask, SweepPlan
from ldam_sweep.store import failed_rows
from ldam_sweep.store.layout import read_generation
from ldam_sweep.store.lease import StoreLease
from ldam_sweep.store.location import StoreLocation


class Dispatch:
    """Runs ``todo`` on resident actors: retries a failing block up to ``max_attempts``, then records
    it as failed; on Ctrl-C commits what finished and stops."""

    def __init__(self, plan: SweepPlan, loc: StoreLocation, todo: list[BlockTask], summary: SweepSummary,
                 console: Console, lease: StoreLease | None, events: SweepCallback) -> None:
        self.plan, self.job, self.loc = plan, plan.job, loc
        self.summary, self.console, self.lease, self.events = summary, console, lease, events
        self.queue = collections.deque(todo)
        self.attempts: collections.Counter = collections.Counter()
        self.buffer = CommitBuffer(loc.url, plan.job.resources.commit_every, lease, on_commit=events.on_commit)
        self.spec_hash = plan.store.spec_hash()
        self.generation = None if lease is None else lease.record.generation  # the store the workers write into
        events.on_start(summary, todo)

    def run(self, address: str | None, num_cpus: int | None) -> None:
        import ray

        t_ray = time.perf_counter()
        started = init_ray(address, num_cpus)
        self.summary.startup["ray_init_s"] = time.perf_counter() - t_ray
        watch = HeadWatch(self.lease, started, self.console)
        watch.start()
        pool, t0 = self._pool(), time.perf_counter()
        try:
            self._loop(pool)
        except KeyboardInterrupt:
            self.summary.interrupted = True
            self.console.print("interrupted: committing finished blocks and stopping workers (Ctrl-C again: stop at "
                               "once)", highlight=False, markup=False)
        finally:
            with ShutdownGuard(lambda: setattr(self.summary, "interrupted", True), self.console) as guard:
                try:
                    self.buffer.flush()
                except StopNow:
                    pass
                finally:
                    guard.committing = False
                    self.events.on_blocks_end(self.summary)
                    self.summary.seconds = time.perf_counter() - t0
                    self.summary.worker_niceness = sorted(set(pool.niceness.values()))
                    self.summary.startup.update(pool.first_ready)
                    watch.stop()
                    pool.kill()
                    if started:
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
        actors = [actor_cls.remote(self.plan, self.loc.url, max(1, int(res.cpus_per_actor)), self.generation)
                  for _ in range(res.actors)]
        return WorkerPool(actors, res.max_in_flight or PER_ACTOR_IN_FLIGHT * len(actors), self.console)

    def _loop(self, pool: WorkerPool) -> None:
        res = self.job.resources
        while self.queue or pool.inflight:
            pool.admit(0)
            while not pool.capacity and not pool.inflight and pool.starting:
                self.console.print(f"waiting for workers to start ({len(pool.starting)} asked: {res.cpus_per_actor} "
                                   f"CPU, {self.gpus} GPU each) ...", highlight=False, markup=False)
                pool.admit(60.0)
            pool.submit(self.queue, self.attempts, lambda batch, i: self.events.on_block_start(
                batch, i, [self.attempts[t.key] for t in batch]))
            if not pool.inflight:
                raise LdamError(f"no worker could start or every worker died for good; {len(self.queue)} blocks were "
                                "not run. What was committed stays committed: rerun the same command to resume.")
            for ref, batch, i in pool.next_done(timeout=30.0):
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
