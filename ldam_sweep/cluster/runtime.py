"""Ray for a sweep: starting or joining it, the resident actors (``WorkerPool``), and the watch on
the Ray head that stops the driver cleanly when the head goes away (``HeadWatch``)."""

from __future__ import annotations

import collections
import logging
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
MAX_DEATHS_IN_A_ROW = 5  # an actor that dies this often before it ever answers is dropped


def init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Join ``address`` or start a local Ray; True when this call started it (the driver stops it)."""
    import ray

    if ray.is_initialized():
        return False
    # Ray's own logging through Ray's options: a local Ray this driver starts is an implementation
    # detail (its start-up and token lines are noise; errors still show); a cluster it joins is the
    # user's, whose warnings they should see
    kwargs: dict[str, Any] = {"namespace": "ldam-sweep", "log_to_driver": False,
                              "logging_level": logging.WARNING if address else logging.ERROR}
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


ADDRESS_WAIT_S = 10.0  # how long a cluster's head may refuse connections before the sweep gives up


def probe_address(address: str | None, wait_s: float = ADDRESS_WAIT_S) -> None:
    """Before any store is touched: the Ray head at ``address`` accepts connections (retried for
    ``wait_s`` seconds, for a head that is starting). ``ray.init`` itself retries an unreachable
    head for many minutes, with a warning every few seconds; this fails in seconds, with one line.
    ``None``/``local``: a local Ray is started later, nothing to probe."""
    if not address or address == "local":
        return
    import socket

    where = address
    try:
        if address.startswith("ray://"):
            where = address.removeprefix("ray://").split("/", 1)[0]
        else:  # host:port, or auto (RAY_ADDRESS, else the cluster `ray start` recorded on this machine)
            from ray._private.services import canonicalize_bootstrap_address_or_die

            where = canonicalize_bootstrap_address_or_die(address)
        host, _, port = where.rpartition(":")
        target = (host.strip("[]"), int(port))
    except Exception as err:  # no cluster found for auto, a malformed address
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RayStartError(f"cannot join Ray at address {address!r}: {first}. Start the cluster (`ray start --head`) "
                            "or pass its head's address (HOST:6379); nothing was changed.") from None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            socket.create_connection(target, timeout=2.0).close()
            return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise RayStartError(
                    f"cannot join Ray at address {address!r}: its head {where} refused or did not answer for "
                    f"{wait_s:.0f}s ({type(err).__name__}: {err}). Check that the cluster is up (`ray status "
                    f"--address {where}`); nothing was changed.") from None
            time.sleep(0.5)


def niceness_cause(nice: int) -> str:
    """Why a worker runs at ``nice``: the driver's own niceness (the user's `nice`, which a local Ray's
    workers inherit), or Ray's default for a cluster started with `ray start` (nice 15)."""
    if nice == os.nice(0):
        return "as this driver does (started with `nice`; a local Ray's workers inherit it)"
    return (f"as Ray starts workers unless told otherwise: start the cluster with {WORKER_NICENESS_ENV}=0 in "
            "`ray start`'s environment")


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
    exist, or nodes still being added) never holds work hostage.

    An actor is dropped only when it cannot come back: its constructor failed (``actor_init_failed``,
    the error printed once) or it died for good several times in a row. One that Ray reports as
    unavailable (its node lost, Ray restarting it: ``max_restarts=-1``) is asked again, and answers
    once Ray has placed it again (a node that joins). ``grow`` adds actors (nodes that joined)."""

    def __init__(self, actors: list[Any], limit: int | None, console: Console,
                 make: Callable[[], Any] | None = None) -> None:
        self.actors: list[Any] = []
        self.fixed_limit = limit  # None: PER_ACTOR_IN_FLIGHT per actor, as the pool grows
        self.console = console
        self.make = make
        self.starting: dict[Any, int] = {}
        self.capacity: dict[int, int] = {}  # started actor -> free slots
        self.batch_units: dict[int, dict[str, int]] = {}  # started actor -> units per batch, by layer
        self.niceness: dict[int, int] = {}  # started actor -> its process's nice value
        self.nodes: dict[int, str] = {}  # started actor -> the node it runs on
        self.inflight: dict[Any, tuple[list[BlockTask], int]] = {}  # ref -> (blocks, actor)
        self.dead: dict[int, str] = {}  # actors that cannot come back -> why
        self.failures: collections.Counter = collections.Counter()  # actor -> deaths in a row
        self.asked = time.perf_counter()
        self.first_ready: dict[str, Any] = {}  # the first started actor's start-up, for the summary
        for a in actors:
            self._add(a)

    @property
    def limit(self) -> int:
        return self.fixed_limit or PER_ACTOR_IN_FLIGHT * max(1, len(self.actors) - len(self.dead))

    def _add(self, actor: Any) -> None:
        i = len(self.actors)
        self.actors.append(actor)
        self.starting[actor.identity.remote()] = i

    def grow(self, target: int) -> int:
        """Add actors until there are ``target`` live ones (``make`` builds one); how many were added."""
        live = len(self.actors) - len(self.dead)
        if self.make is None or target <= live:
            return 0
        for _ in range(target - live):
            self._add(self.make())
        return target - live

    def admit(self, timeout: float) -> None:
        """Give slots to the actors that have started by now (waiting up to ``timeout`` s)."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError

        if not self.starting:
            return
        ready, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=timeout)
        for ref in ready:
            i = self.starting.pop(ref)
            try:
                ident = ray.get(ref)
            except ActorUnavailableError:  # its node lost, Ray restarting it: ask again, it answers once placed
                self.starting[self.actors[i].identity.remote()] = i
                continue
            except ActorDiedError as err:
                self.failures[i] += 1
                if not err.actor_init_failed and self.failures[i] < MAX_DEATHS_IN_A_ROW:
                    self.starting[self.actors[i].identity.remote()] = i  # died mid-start: Ray restarts it
                    continue
                self._drop(i, error_text(err))
                continue
            except RayError as err:
                self._drop(i, error_text(err))
                continue
            self.failures[i] = 0
            if not self.first_ready:
                self.first_ready = {"first_worker_s": time.perf_counter() - self.asked, "worker": ident["startup"]}
            self.batch_units[i] = ident["batch_units"]
            self.capacity[i] = PER_ACTOR_IN_FLIGHT
            self.nodes[i] = ident["node"]
            nice = ident["niceness"]
            if nice > 0 and nice not in self.niceness.values():  # once per nice value, not per actor
                self.console.print(f"note: worker {i} runs at nice {nice}, {niceness_cause(nice)}; beside other busy "
                                   "processes it gets a small share of the CPU", highlight=False, markup=False)
            self.niceness[i] = nice

    def _drop(self, i: int, why: str) -> None:
        """Actor ``i`` cannot come back: said once, never asked again."""
        if i not in self.dead:
            self.dead[i] = why
            self.console.print(f"worker {i} failed to start: {why}", highlight=False, markup=False)
        self.capacity.pop(i, None)

    @property
    def hopeless(self) -> bool:
        """Every actor is dead for good: no block can run any more."""
        return bool(self.actors) and len(self.dead) == len(self.actors)

    def submit(self, queue: collections.deque[BlockTask], attempts: collections.Counter,
               started: Callable[[list[BlockTask], int], None] | None = None) -> None:
        """Send queued blocks, packed into batches, to started actors with free slots."""
        limit = self.limit
        for i in list(self.capacity):
            while queue and self.capacity[i] > 0 and len(self.inflight) < limit:
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
        """Actor ``i``'s process died or became unreachable (a RayActorError): it gets no work until
        it answers again, as a new start. Ray restarts it (``max_restarts=-1``), on another node if
        its node is gone; one that cannot come back is dropped by ``admit``. Decided by what the
        actor does, not by the text of Ray's error."""
        self.capacity.pop(i, None)
        if i not in self.starting.values() and i not in self.dead:
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
