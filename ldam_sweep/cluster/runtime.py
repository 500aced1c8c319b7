"""Ray for a sweep: starting or joining it, the resident actors (``WorkerPool``), and the watch on
the Ray head that stops the driver cleanly when the head goes away (``HeadWatch``)."""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
import traceback
from typing import Any, Callable

from rich.console import Console

from ldam_sweep.errors import RayStartError
from ldam_sweep.planning import BlockTask, pack_batch

# Tasks (batches) in flight per actor, and the threads of its actor: one batch samples while the
# other is written, so the device idles only when writing is slower than sampling. It also bounds
# the worker's host memory (at most this many batches per actor exist at once).
PER_ACTOR_IN_FLIGHT = 2
WORKER_NICENESS_ENV = "RAY_worker_niceness"
HEAD_LOST_ENV = "LDAM_SWEEP_HEAD_LOST_AFTER"  # seconds the Ray head may be unreachable (default 10)


def init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Join ``address`` or start a local Ray; True when this call started it (the driver stops it)."""
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


def error_text(err: Exception) -> str:
    """The one line a failed block records: the worker's own exception, else Ray's last line."""
    cause = getattr(err, "cause", None)
    if cause is not None:
        return "".join(traceback.format_exception_only(type(cause), cause)).strip()
    return str(err).strip().splitlines()[-1]


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
            except RayError as err:
                self.console.print(f"worker {i} failed to start: {error_text(err)}", highlight=False, markup=False)
                continue
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

    def submit(self, queue: collections.deque[BlockTask], attempts: collections.Counter,
               started: Callable[[list[BlockTask], int], None] | None = None) -> None:
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
                if started is not None:
                    started(batch, i)

    def next_done(self, timeout: float) -> list[tuple[Any, list[BlockTask], int]]:
        """(ref, blocks, actor) of the batches that finished (at most one), their slots freed."""
        import ray

        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=timeout)
        out = []
        for ref in ready:
            batch, i = self.inflight.pop(ref)
            if i in self.capacity:
                self.capacity[i] = min(PER_ACTOR_IN_FLIGHT, self.capacity[i] + 1)
            out.append((ref, batch, i))
        return out

    def lost(self, i: int) -> None:
        """Actor ``i``'s process died (a RayActorError): it gets no work until it answers again,
        as a new start. Ray restarts it (``max_restarts=-1``); one that cannot come back (its
        constructor fails, Ray gives up on it) never answers and stays out, with its error printed
        by ``admit``. Decided by what the actor does, not by the text of Ray's error."""
        self.capacity.pop(i, None)
        if i not in self.starting.values():
            self.starting[self.actors[i].identity.remote()] = i

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


class HeadWatch:
    """Watches the Ray head (its GCS) while blocks run. Ray's own client gives up after 60 s without
    the GCS and ends the process from C++ (exit 1, "Failed to connect to GCS", no cleanup). Before
    that, when the GCS has refused connections for ``HEAD_LOST_ENV`` seconds, this thread prints one
    line, releases the lease, stops the Ray processes this driver started, and exits 3: committed
    blocks stay committed and the same command resumes once the cluster is back."""

    def __init__(self, lease: Any, started: bool, console: Console) -> None:
        self.lease, self.started, self.console = lease, started, console
        self.after = float(os.environ.get(HEAD_LOST_ENV, 10.0))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._node: Any = None
        self._known: dict[int, int] = {}  # the local Ray's processes when the head last answered: pid -> start time

    def start(self) -> None:
        import ray

        address = ray.get_runtime_context().gcs_address
        host, _, port = address.rpartition(":")
        if self.started:
            self._node = ray._private.worker._global_node
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
                if self._node is not None:
                    # Ray's workers are children of the raylet, which exits when the head goes: then
                    # they are no longer found by parentage. Known from a second before, they still are.
                    self._known = ray_processes(self._node)
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
            if self._node is not None:  # the local Ray this driver started: none of its processes outlive it
                kill_processes({**self._known, **ray_processes(self._node)})
        finally:
            os._exit(RayStartError.exit_code)


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state first), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def ray_processes(node: Any) -> dict[int, int]:
    """The processes of the local Ray ``node`` and all their descendants (Ray's agents and workers
    rename themselves, so they are found by parentage): pid -> start time (tells a reused pid)."""
    roots = {info.process.pid for infos in node.all_processes.values() for info in infos if info.process is not None}
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        fields = _proc_stat(int(entry)) if entry.isdigit() else None
        if fields is not None and len(fields) > 19:
            children.setdefault(int(fields[1]), []).append(int(entry))
            starts[int(entry)] = int(fields[19])
    todo, found = [p for p in roots if p in starts], {}
    while todo:
        pid = todo.pop()
        if pid not in found and pid != os.getpid():
            found[pid] = starts[pid]
            todo += children.get(pid, [])
    return found


def kill_processes(procs: dict[int, int], wait_s: float = 10.0) -> None:
    """SIGKILL each (pid, start time) that is still that process, then wait (up to ``wait_s``)
    until none of them runs any more (gone, or a zombie for its parent to reap)."""
    def running(pid: int, start: int) -> bool:
        fields = _proc_stat(pid)
        return fields is not None and len(fields) > 19 and int(fields[19]) == start and fields[0] not in ("Z", "X")

    left = {pid: start for pid, start in procs.items() if running(pid, start)}
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + wait_s
    while left and time.monotonic() < deadline:
        left = {pid: start for pid, start in left.items() if running(pid, start)}
        if left:
            time.sleep(0.02)
