"""The driver: stage 1 (discriminator, once), then (layer, block) tasks dispatched to resident Ray
actors with a bounded number in flight, manifest rows committed in batches, then stage 3.

Crash semantics: a block counts as done only when its rows are committed; rerunning the same
command resumes from the manifest. Ray may run a block twice (actor restarts); that is harmless
(deterministic chains, whole-object overwrites, readers de-duplicate). A block that fails
``max_attempts`` times gets 'failed' rows with its error and the sweep goes on. What happens is
reported through ``events.SweepCallback``. Stage 2 is ``dispatch``, Ray is ``runtime``, the
commit path ``commit``, stages 1 and 3 ``stages``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.text import Text

from ldam_sweep.cluster.commit import storage_stop
from ldam_sweep.cluster.dispatch import Dispatch
from ldam_sweep.cluster.events import Callbacks, ProgressEvents, SummaryEvents, SweepCallback, SweepSummary
from ldam_sweep.cluster.runtime import probe_address
from ldam_sweep.cluster.signals import Interrupted, StopSignals
from ldam_sweep.cluster.stages import StageInputs, check_stage_inputs, stage1, stage1_prior, stage3
from ldam_sweep.errors import StoreDamagedError, StoreError
from ldam_sweep.planning import SweepPlan, check_block_memory, resolve
from ldam_sweep.spec import JobSpec, job_doc
from ldam_sweep.store import create_store, open_store
from ldam_sweep.store.layout import as_stored, check_store, committed_unit_count, read_generation, read_sampler_revision
from ldam_sweep.store.schema import StorePlan
from ldam_sweep.store.lease import StoreLease
from ldam_sweep.store.location import StoreLocation, check_writable
from ldam_sweep.store.transport import StoreIO

__all__ = ["SweepCallback", "SweepSummary", "run_sweep"]


def run_sweep(spec: JobSpec | dict[str, Any] | str | os.PathLike, store: str | StoreLocation | None = None,
              address: str | None = None, fresh: bool = False, *, console: Console | None = None,
              num_cpus: int | None = None, confirm_fresh: Callable[[str, int], bool] | None = None,
              realism: bool = True, callbacks: list[SweepCallback] | None = None,
              model: Any = None) -> SweepSummary:
    """Run (or resume) a whole sweep. Local Ray by default; ``address`` joins an existing cluster.

    ``model``: your own ``torch.nn.Module`` (or a ``ModelHandle``) instead of the spec's ``model:``
    section, which the spec then leaves out (``model.input`` may stay, for the module's input); Ray
    ships the module to every actor. The store records it as ``model: {module: <its class>}``:
    readers that run the model (``find``) must be given it again.

    The driver holds the store's lease from before it touches the store until it returns
    (StoreOwnedError while another driver holds it). ``fresh`` deletes the store and starts over;
    when the store has committed units, ``confirm_fresh(url, units)`` must say yes first
    (the CLI's ``--yes`` or typed confirmation; None: the caller already asked). ``realism``: measure
    the samples' realism after stage 2 (stage 3; when the job has data and the stored record is not
    current). ``callbacks``: ``SweepCallback``s told of every block, commit and the end.

    Ctrl-C and SIGTERM stop it cleanly from its first step to its last (``signals``); a store that
    stops answering is retried for ``resources.storage_patience`` seconds (``store.transport``)."""
    entered = time.perf_counter()
    console = console or Console(stderr=True)
    run = _Run(console, address, num_cpus, realism, callbacks, entered, module=model)
    with StopSignals(announce=run.say) as run.signals:  # Ctrl-C and SIGTERM, from here to the end
        try:
            return run.sweep(spec, store, fresh, confirm_fresh)
        except KeyboardInterrupt as err:  # say which signal (Ray re-raises ours as a plain KeyboardInterrupt)
            if isinstance(err, Interrupted) or run.signals.signum is None:
                raise
            raise Interrupted(run.signals.signum) from None


@dataclass
class _Run:
    """One driver run: where it prints, how it stops, how it reaches the store."""

    console: Console
    address: str | None
    num_cpus: int | None
    realism: bool
    callbacks: list[SweepCallback] | None
    entered: float
    module: Any = None  # the caller's own nn.Module / ModelHandle, in place of the spec's model section
    signals: StopSignals = field(default_factory=StopSignals)
    io: StoreIO = field(default_factory=StoreIO)

    def say(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)

    def sweep(self, spec: Any, store: Any, fresh: bool, confirm_fresh: Callable[[str, int], bool] | None) -> SweepSummary:
        from ldam_sweep.model import load_model

        with self.signals.armed():  # everything wrong with the spec or the cluster fails here, before any work
            module = None
            if self.module is not None:
                module, spec = with_module(spec, self.module)
            job, doc = job_doc(spec)
            loc = StoreLocation.parse(store or job.store.url or Path("storage") / f"{job.name}.zarr")  # --store, spec, default
            self.io = StoreIO(loc.url, job.resources.storage_patience, log=self.say)
            check_writable(loc)
            probe_address(self.address)  # an unreachable cluster fails in seconds, before the store exists
            model = module or load_model(job.model, device="cpu", log=lambda m: self.console.print(Text(m, style="dim")))
            plan = resolve(job, model, doc)  # the one plan: the driver, stage 1 and the workers use it
            if not fresh:  # a store made by older code resumes in its own format (without starts, float16, ...)
                stored = self.io("reading the store", as_stored, loc, plan.store)
                if stored is not plan.store and job.store.model_fields_set - {"url"}:
                    self.say(f"store {loc.url}: made by an earlier version, it keeps its own image format "
                             f"({stored.pixels}, snapshots full size); the spec's store: settings apply to new stores")
                plan = plan.with_store(stored)
            check_block_memory(plan.store)
            inputs = check_stage_inputs(job, model)
            state = self._storage("checking the store", check_store, loc, plan.store, fresh=fresh)
        # not armed: a signal now is recorded, and raised as the next armed region starts
        doing = "--fresh" if fresh else "this run"
        lease = self._storage("taking the store's lease", lambda at: StoreLease.acquire(at, doing=doing, log=self.say), loc)
        try:
            with self.signals.armed():
                lease.start_heartbeat()
                self._open(loc, plan.store, state, fresh, confirm_fresh, lease)
                plan = plan.with_revision(self.io("reading the store", read_sampler_revision, loc))  # its own sampler
            return self._stages(plan, model, inputs, loc, lease)
        except OSError as err:  # a full disk anywhere (stage 1 included): exit 4, not a traceback or exit 2
            stop = storage_stop(err, "writing to the store")
            if stop is None:
                raise
            raise stop from None
        finally:
            lease.release()

    def _storage(self, what: str, fn: Callable[..., Any], loc: StoreLocation, *args: Any, **kwargs: Any) -> Any:
        """A first step on the store: retried while it does not answer; a full disk, permissions, a
        missing bucket are one clear error."""
        try:
            return self.io(what, fn, loc, *args, **kwargs)
        except OSError as err:
            raise storage_stop(err, what) or StoreError(
                f"cannot create the store at {loc.url!r}: {type(err).__name__}: {err}") from None

    def _open(self, loc: StoreLocation, plan: StorePlan, state: str, fresh: bool,
              confirm_fresh: Callable[[str, int], bool] | None, lease: StoreLease) -> None:
        """Create the store (or check the one there) under the lease, which learns its generation."""
        if fresh and state != "absent":
            _confirm_fresh(loc, confirm_fresh)
        self._storage("creating the store", create_store, loc, plan, fresh=fresh)
        lease.set_generation(self.io("reading the store", read_generation, loc) or "")
        if state == "same" and not fresh:
            self.io("checking the store's files", _check_files, loc)

    def _stages(self, plan: SweepPlan, model: Any, inputs: StageInputs, loc: StoreLocation,
                lease: StoreLease) -> SweepSummary:
        """Stage 1, the blocks not committed yet, stage 3. Each runs in an armed region of ``signals``:
        a stop in stage 1 ends the run (nothing of it is kept), one in stage 2 commits what finished,
        one in stage 3 ends the sweep as interrupted (its blocks are all committed)."""
        tasks, io, say = plan.tasks, self.io, self.say
        with self.signals.armed():
            say(f"store {loc.url}: {len(plan.store.layers)} layers, "
                f"{sum(lp.planned_units() for lp in plan.store.layers)} units, {len(tasks)} blocks")
            st = io("opening the store", open_store, loc)
            d_acc = stage1(plan, model, st, inputs, self.console, io)
            prior = stage1_prior(plan, model, st, inputs, self.console, io)
            # dead units are done: not sampled again
            committed = io("reading the manifest", lambda: st.refresh().units(status=("ok", "dead")))
            done_keys = {(r["layer"], r["block"]) for r in committed.select(["layer", "block"]).to_pylist()}
            todo = [t for t in tasks if t.key not in done_keys]
            say(f"resume: {len(tasks) - len(todo)} of {len(tasks)} blocks already committed, {len(todo)} to run")
        summary = SweepSummary(store=loc.url, planned_blocks=len(tasks), skipped_blocks=len(tasks) - len(todo),
                               done_blocks=0, failed_blocks=0, units_done=0, units_failed=0, seconds=0.0,
                               discriminator_accuracy=d_acc, prior_digest=(prior or {}).get("digest"))
        summary.startup["driver_s"] = time.perf_counter() - self.entered
        events = Callbacks([SummaryEvents(summary), ProgressEvents(self.console), *(self.callbacks or [])])
        if todo:
            dispatch = Dispatch(plan, loc, todo, summary, self.console, lease, events, self.signals, io)
            dispatch.module = model.net if plan.job.model.module else None  # shipped to the actors by Ray
            dispatch.run(self.address, self.num_cpus)
        if self.realism and plan.job.data is not None and not summary.interrupted:
            try:
                with self.signals.armed():
                    io("checking the lease", lambda: lease.check(read_generation(loc)))
                    summary.realism = stage3(loc.url, self.console, io)
            except KeyboardInterrupt:
                summary.interrupted, summary.signal = True, self.signals.name
                say(f"{self.signals.name}: stage 3 (realism) stopped; every block is committed: `ldam-sweep "
                    f"realism {loc.url}` measures it later")
        events.on_end(summary)
        return summary


def with_module(spec: Any, module: Any) -> tuple[Any, Any]:
    """(the caller's module as a ModelHandle, the spec as a document whose model section names it).
    The spec (a dict, a YAML path or a JobSpec) must leave ``model:`` out, or give only its ``input``."""
    from ldam_sweep.errors import SpecError
    from ldam_sweep.model import load_model
    from ldam_sweep.spec import JobSpec, read_yaml

    doc = (spec.model_dump(mode="json", exclude_none=True) if isinstance(spec, JobSpec)
           else dict(spec) if isinstance(spec, dict) else read_yaml(Path(spec)))
    given = dict(doc.get("model") or {})
    if set(given) - {"input", "module"}:
        raise SpecError(f"run_sweep(model=...) takes the model from Python: leave the spec's model section out (it "
                        f"names {sorted(set(given) - {'input', 'module'})}), or give only model.input")
    handle = load_model(module, device="cpu", input=given.get("input"))
    name = handle.name.removeprefix("module:")
    doc["model"] = {"module": name, "input": handle.input.model_dump(mode="json")}
    if isinstance(spec, (str, os.PathLike)):  # paths in a spec file are relative to it, as for `run`
        from ldam_sweep.spec import parse_job, resolve_job_paths

        return handle, resolve_job_paths(parse_job(doc, where=f"job spec {str(spec)!r}"), Path(spec).parent)
    return handle, doc


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


def _check_files(loc: StoreLocation) -> None:
    """Before a run resumes a store: its metadata and manifest parts are intact (``verify`` checks
    the same); the discriminator is stage 1's, the realism record stage 3's to check and redo."""
    from ldam_sweep.store.verify import file_problems

    problems = [p for p in file_problems(loc)[0] if p.kind not in ("discriminator", "prior", "realism", "lease", "verify-record")]
    if problems:
        raise StoreDamagedError(f"store {loc.url!r} is damaged: {problems[0]}" + (
            f" (and {len(problems) - 1} more: `ldam-sweep verify {loc.url}` lists them)" if len(problems) > 1 else ""))
