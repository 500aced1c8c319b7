"""The stages around sampling: stage 1 makes (or reuses) the store's discriminator and ``walk``'s
score prior once, stage 3 measures the samples' realism; ``check_stage_inputs`` loads every file a
spec names before any store exists."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from ldam_sweep.cluster.commit import storage_stop
from ldam_sweep.errors import LdamError, StoreDamagedError
from ldam_sweep.planning import SweepPlan
from ldam_sweep.settings import DiscriminatorSettings
from ldam_sweep.spec import JobSpec
from ldam_sweep.store import open_store
from ldam_sweep.store.integrity import FROZEN
from ldam_sweep.store.layout import write_frozen
from ldam_sweep.store.transport import StoreIO


def stage1(plan: SweepPlan, model: Any, st: Any, inputs: StageInputs, console: Console,
           io: StoreIO = StoreIO()) -> float | None:
    """Train or load the discriminator once and keep it in the store; a resumed sweep reuses it once
    its bytes match the checksum its record names. One that is incomplete (a stage 1 cut short) or
    damaged is made again, and must be the one the committed blocks were sampled with. ``io``: how
    the store is reached (retried while it does not answer)."""
    job = plan.job
    if job.discriminator is None:
        return None
    say = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731
    state, why = io("reading the discriminator", st.discriminator_state)
    if state == "legacy" and not legacy_discriminator_intact(st, model):
        state, why = "corrupt", "its weights do not match the digest its record names"
    if state in ("ok", "legacy"):
        info = st.discriminator_info()
        say(f"stage 1: discriminator already in the store (held-out accuracy {info['heldout_accuracy']:.3f})")
        return float(info["heldout_accuracy"])
    if state != "absent":
        say(f"stage 1: the stored discriminator is {state} ({why}); making it again")
    from ldam_sweep.model.loading import default_device
    from ldam_sweep.stage import discriminator_record, job_discriminator

    used = _used(io, st, "discriminator")
    model.to(default_device())
    t0 = time.perf_counter()
    what = "loading" if job.discriminator.file is not None else "training"
    total = DiscriminatorSettings(**(job.discriminator.train or {})).updates if job.discriminator.train is not None else 0
    say(f"stage 1: {what} the discriminator on {model.device}" + (f" ({total} updates) ..." if total else " ..."))
    last = [time.perf_counter()]
    began = time.perf_counter()

    def report(i: int, stats: dict) -> None:
        now = time.perf_counter()
        left = (now - began) / i * (total - i)
        if i == 1 and total > 1:  # its cost, before it is paid: the first update times the rest
            say(f"  stage 1 will take about {_duration(left + now - began)} ({now - began:.1f}s for the first of "
                f"{total} updates)")
        elif now - last[0] > 10:
            last[0] = now
            say(f"  D update {i}/{total}: loss {stats['loss']:.3f}, batch accuracy {stats['accuracy']:.2f}, about "
                f"{_duration(left)} left")

    trained = job_discriminator(job, model, progress=report, plan=plan, loaded=inputs.discriminator, train=inputs.train)
    model.to("cpu")
    assert trained is not None
    _keep(io, st, "discriminator", trained.to_bytes(), discriminator_record(trained), used, job.discriminator.file)
    say(f"stage 1: held-out accuracy {trained.heldout_accuracy:.3f} (real {trained.heldout_real_accuracy:.3f}, "
        f"fresh chains {trained.heldout_fake_accuracy:.3f}) in {time.perf_counter() - t0:.0f}s")
    return trained.heldout_accuracy


def stage1_prior(plan: SweepPlan, model: Any, st: Any, inputs: StageInputs, console: Console,
                 io: StoreIO = StoreIO()) -> dict[str, Any] | None:
    """``method: walk``: train or load the score prior once and keep it in the store (its bytes, a
    sealed record with their sha256, as the discriminator's); a resumed sweep reuses it once its
    bytes match. One damaged or incomplete is made again and must be the one the committed blocks
    walked on. Returns its record (None without a prior section)."""
    job = plan.job
    if job.prior is None:
        return None
    from ldam_sweep.stage import prior_line

    say = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731
    state, why = io("reading the score prior", st.prior_state)
    if state == "ok":
        info = st.prior_info()
        given = None if inputs.prior is None else inputs.prior.digest()
        if given is None or given == info.get("digest"):
            say(f"stage 1: score prior already in the store ({prior_line(info)})")
            return info
        say(f"stage 1: prior.file {str(job.prior.file)!r} holds another score prior than the store's "
            f"({given[:12]}, the store's {str(info.get('digest'))[:12]}); keeping the file's")
    elif state != "absent":
        say(f"stage 1: the stored score prior is {state} ({why}); making it again")
    from ldam_sweep.model.loading import default_device
    from ldam_sweep.settings import PriorSettings
    from ldam_sweep.stage import job_prior, prior_record

    used = _used(io, st, "prior")
    device = default_device()
    if device.type == "cuda":  # as the workers run (deterministic kernels by default): a prior made again matches
        from ldam_sweep.cluster.worker import set_determinism

        set_determinism(job.resources.deterministic)
    if job.prior.file is not None:
        say("stage 1: loading the score prior ...")
    else:
        settings = PriorSettings(**(job.prior.train or {}))
        say(f"stage 1: training the score prior on {device} ({settings.steps} steps, 3 hidden layers of "
            f"{settings.hidden}; the default takes ~6 min on 2 CPU cores) ...")
    prior = job_prior(job, model, loaded=inputs.prior, train=inputs.train, device=device)
    assert prior is not None
    record = prior_record(prior)
    _keep(io, st, "prior", prior.to_bytes(), record, used, job.prior.file)
    say(f"stage 1: score prior ready ({prior_line(record)})")
    return record


def _used(io: StoreIO, st: Any, column: str) -> set[str]:
    """The digests of the frozen model ``column`` (discriminator, prior) the committed rows name."""
    return {d for d in io("reading the manifest", st.units, status=("ok", "dead"))[column].to_pylist() if d}


def _keep(io: StoreIO, st: Any, name: str, blob: bytes, record: dict[str, Any], used: set[str],
          file: Any = None) -> None:
    """Keep a frozen model made in stage 1 (``name``: discriminator, prior; loaded from ``file`` or
    trained): refused when the committed blocks were sampled with another one (StoreDamagedError),
    written with its sealed record."""
    url = st.loc.url
    if used and used != {record["digest"]}:
        what = FROZEN[name]
        why = (f"the file {str(file)!r} now holds another {what} than the one they used: put that one back"
               if file is not None else
               "training on another machine, device, thread count or library version gives other weights")
        raise StoreDamagedError(
            f"stage 1: the {what} {'loaded' if file is not None else 'made again'} (digest {record['digest'][:12]}) is "
            f"not the one the committed units of {url!r} were sampled with ({', '.join(sorted(d[:12] for d in used))}): "
            f"{why}. The store cannot be completed consistently otherwise: start it over with "
            f"`ldam-sweep run SPEC --store {url} --fresh`, or use it as it is.")
    try:
        io(f"writing the {name}", write_frozen, url, name, blob, record)
    except OSError as err:
        raise storage_stop(err, f"writing the {name} (stage 1)") or err from None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f} min"


def legacy_discriminator_intact(st: Any, model: Any) -> bool:
    """A discriminator stored before its bytes had a checksum: its weights match its record's digest."""
    import warnings

    from ldam_sweep.sampling.discriminator import load_discriminator

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_discriminator(st.discriminator_bytes(), model).digest() == st.discriminator_info().get("digest")
    except LdamError:
        return False


def stage3(url: str, console: Console, io: StoreIO = StoreIO()) -> dict[str, Any] | None:
    """Measure the samples' realism (``ldam_sweep.realism``) unless the stored record is current."""
    from ldam_sweep.realism import layer_line, measure_realism
    from ldam_sweep.store.realism import write_realism

    st = io("opening the store", open_store, url)
    doc = io("reading the realism record", st.realism)
    measured = [r["name"] for r in io("reading the manifest", st.layers) if r["done"] - r["dead"] > 0]
    if doc and measured and all(doc["current"].get(name) for name in measured):
        console.print("stage 3: realism already measured for every committed unit", highlight=False, markup=False)
    else:
        console.print("stage 3: realism of the samples (two-sample test: 0.5 = indistinguishable from the real data; "
                      "HF: fine detail / the real data's; the units' exemplars in brackets) ...",
                      highlight=False, markup=False)

        def report(name: str, e: dict[str, Any]) -> None:
            console.print("  " + layer_line(name, e), highlight=False, markup=False)

        try:
            doc = io("reading the samples", measure_realism, st, progress=report)
            io("writing the realism record", write_realism, st.loc, doc)
        except OSError as err:
            raise storage_stop(err, "writing the realism record") or err
        except (LdamError, ValueError) as err:
            console.print(f"stage 3: realism not measured: {err}", highlight=False, markup=False)
            return None
    pooled = (doc or {}).get("pooled") or {}
    return {"c2st": pooled.get("c2st"), "c2st_exemplars": pooled.get("c2st_exemplars"),
            "hf_ratio": pooled.get("hf_ratio"), "seconds": (doc or {}).get("seconds")}


@dataclass
class StageInputs:
    """What ``check_stage_inputs`` loaded, kept for stage 1 (loaded once): the discriminator file's
    discriminator and the real training images of a folder or .npy source."""

    discriminator: Any = None
    train: Any = None
    prior: Any = None  # the prior file's score prior


def check_stage_inputs(job: JobSpec, model: Any) -> StageInputs:
    """Every file the spec names loads (the model's weights already did): the discriminator file
    (weights_only=True, fits the model) and a folder or .npy data source, before any store exists."""
    inputs = StageInputs()
    if job.discriminator is not None and job.discriminator.file is not None:
        from ldam_sweep.sampling.discriminator import load_discriminator

        inputs.discriminator = load_discriminator(job.discriminator.file, model)
    if job.prior is not None and job.prior.file is not None:
        from ldam_sweep.sampling.chains import check_prior
        from ldam_sweep.sampling.prior import load_score_prior

        inputs.prior = load_score_prior(job.prior.file)
        check_prior(inputs.prior, model)
    if job.data is not None and job.data.source in ("folder", "npy"):
        from ldam_sweep.data import real_images

        inputs.train = real_images(job.data, model.input, "train")
    return inputs
