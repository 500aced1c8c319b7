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
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.text import Text

from ldam_sweep.cluster.commit import storage_stop
from ldam_sweep.cluster.dispatch import Dispatch
from ldam_sweep.cluster.events import Callbacks, ProgressEvents, SummaryEvents, SweepCallback, SweepSummary
from ldam_sweep.cluster.stages import StageInputs, check_stage_inputs, stage1, stage3
from ldam_sweep.errors import StoreDamagedError, StoreError
from ldam_sweep.planning import SweepPlan, check_block_memory, resolve
from ldam_sweep.spec import JobSpec, job_doc
from ldam_sweep.store import create_store, open_store
from ldam_sweep.store.layout import as_stored, check_store, committed_unit_count, read_generation, read_sampler_revision
from ldam_sweep.store.schema import StorePlan
from ldam_sweep.store.lease import StoreLease
from ldam_sweep.store.location import StoreLocation, check_writable

__all__ = ["SweepCallback", "SweepSummary", "run_sweep"]


def run_sweep(spec: JobSpec | dict[str, Any] | str | os.PathLike, store: str | StoreLocation | None = None,
              address: str | None = None, fresh: bool = False, *, console: Console | None = None,
              num_cpus: int | None = None, confirm_fresh: Callable[[str, int], bool] | None = None,
              realism: bool = True, callbacks: list[SweepCallback] | None = None) -> SweepSummary:
    """Run (or resume) a whole sweep. Local Ray by default; ``address`` joins an existing cluster.

    The driver holds the store's lease from before it touches the store until it returns
    (StoreOwnedError while another driver holds it). ``fresh`` deletes the store and starts over;
    when the store has committed units, ``confirm_fresh(url, units)`` must say yes first
    (the CLI's ``--yes`` or typed confirmation; None: the caller already asked). ``realism``: measure
    the samples' realism after stage 2 (stage 3; when the job has data and the stored record is not
    current). ``callbacks``: ``SweepCallback``s told of every block, commit and the end."""
    from ldam_sweep.model import load_model

    entered = time.perf_counter()
    console = console or Console(stderr=True)
    job, doc = job_doc(spec)
    loc = StoreLocation.parse(store or job.store or Path("storage") / f"{job.name}.zarr")  # --store, spec, default
    # everything that can be wrong with the spec fails here, before any work
    check_writable(loc)
    model = load_model(job.model, device="cpu", log=lambda m: console.print(Text(m, style="dim")))
    plan = resolve(job, model, doc)  # the one plan: the driver, stage 1 and the workers use it
    if not fresh:  # a store made before chain starts were kept resumes without them
        plan = plan.with_store(as_stored(loc, plan.store))
    check_block_memory(plan.store)
    inputs = check_stage_inputs(job, model)
    try:
        state = check_store(loc, plan.store, fresh=fresh)
        lease = StoreLease.acquire(loc, doing="--fresh" if fresh else "this run",
                                   log=lambda m: console.print(m, highlight=False, markup=False))
    except OSError as err:  # a full disk, permissions, missing bucket, unreachable endpoint
        raise storage_stop(err, "taking the store's lease") or StoreError(
            f"cannot create the store at {loc.url!r}: {type(err).__name__}: {err}") from None
    try:
        lease.start_heartbeat()
        _open(loc, plan.store, state, fresh, confirm_fresh, lease, console)
        plan = plan.with_revision(read_sampler_revision(loc))  # a store resumes with its own sampler
        return _stages(plan, model, inputs, loc, lease, console, address, num_cpus, realism, callbacks, entered)
    except OSError as err:  # a full disk anywhere (stage 1 included): exit 4, not a traceback or exit 2
        stop = storage_stop(err, "writing to the store")
        if stop is None:
            raise
        raise stop from None
    finally:
        lease.release()


def _open(loc: StoreLocation, plan: StorePlan, state: str, fresh: bool,
          confirm_fresh: Callable[[str, int], bool] | None, lease: StoreLease, console: Console) -> None:
    """Create the store (or check the one there) under the lease, which learns its generation."""
    if fresh and state != "absent":
        _confirm_fresh(loc, confirm_fresh)
    try:
        create_store(loc, plan, fresh=fresh)
    except OSError as err:
        raise storage_stop(err, "creating the store") or StoreError(
            f"cannot create the store at {loc.url!r}: {type(err).__name__}: {err}") from None
    lease.set_generation(read_generation(loc) or "")
    if state == "same" and not fresh:
        _check_files(loc)


def _stages(plan: SweepPlan, model: Any, inputs: StageInputs, loc: StoreLocation, lease: StoreLease,
            console: Console, address: str | None, num_cpus: int | None, realism: bool,
            callbacks: list[SweepCallback] | None, entered: float) -> SweepSummary:
    """Stage 1, the blocks not committed yet, stage 3."""
    say = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731
    tasks = plan.tasks
    say(f"store {loc.url}: {len(plan.store.layers)} layers, {sum(lp.planned_units() for lp in plan.store.layers)} "
        f"units, {len(tasks)} blocks")
    st = open_store(loc)
    d_acc = stage1(plan, model, st, inputs, console)
    committed = st.refresh().units(status=("ok", "dead"))  # dead units are done: not sampled again
    done_keys = {(r["layer"], r["block"]) for r in committed.select(["layer", "block"]).to_pylist()}
    todo = [t for t in tasks if t.key not in done_keys]
    say(f"resume: {len(tasks) - len(todo)} of {len(tasks)} blocks already committed, {len(todo)} to run")
    summary = SweepSummary(store=loc.url, planned_blocks=len(tasks), skipped_blocks=len(tasks) - len(todo),
                           done_blocks=0, failed_blocks=0, units_done=0, units_failed=0, seconds=0.0,
                           discriminator_accuracy=d_acc)
    summary.startup["driver_s"] = time.perf_counter() - entered
    events = Callbacks([SummaryEvents(summary), ProgressEvents(console), *(callbacks or [])])
    if todo:
        Dispatch(plan, loc, todo, summary, console, lease, events).run(address, num_cpus)
    if realism and plan.job.data is not None and not summary.interrupted:
        lease.check(read_generation(loc))
        summary.realism = stage3(loc.url, console)
    events.on_end(summary)
    return summary


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

    problems = [p for p in file_problems(loc)[0] if p.kind not in ("discriminator", "realism", "lease", "verify-record")]
    if problems:
        raise StoreDamagedError(f"store {loc.url!r} is damaged: {problems[0]}" + (
            f" (and {len(problems) - 1} more: `ldam-sweep verify {loc.url}` lists them)" if len(problems) > 1 else ""))
