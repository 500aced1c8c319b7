"""The resident worker: loads the model and discriminator once, then samples and writes batches of blocks.

Plain Python (testable without Ray); the driver wraps it as a threaded Ray actor. It never returns
tensors: a block's arrays go straight into the store and only its manifest rows go back to the driver.

Pipeline: ``run_batch`` has a device phase (sampling, exemplars and scores: tensor math on the
model's device) under a lock, and a host phase (float16 encoding, checksums, Zarr writes) outside
it. With two tasks in flight per actor, batch k+1 samples while batch k is written. Host memory is
bounded by the driver's in-flight limit: at most that many batches per actor exist at once.
Nothing is committed here; the driver commits rows that came back, so a worker dying mid-pipeline
loses only uncommitted work, which is rerun.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ldam_sweep import failpoints

if TYPE_CHECKING:
    from ldam_sweep.planning import SweepPlan

CPU_BATCH_UNITS = 32  # benchmarks/README.md: digits conv2 peaks at 16-32 units per batch, resnet18 is flat 4-64
GPU_MEMORY_HEADROOM = 0.7  # share of the free GPU memory a batch may plan to use
# a batch's stored samples (float16) at most this many bytes: the last batch's write is the one part
# of a sweep nothing overlaps (~1.5 s on one core at this size), and it bounds the host memory a batch
# holds. ResNet-18 @224 px, 8 chains x 4 snapshots: 26 units (so 32, the grid); digits: no limit.
BATCH_SAMPLE_BYTES = 256 << 20
PROBE_UNITS = 2  # the memory probe samples PROBE_UNITS and 2 * PROBE_UNITS units for PROBE_STEPS steps
PROBE_STEPS = 2


def set_determinism(deterministic: bool) -> None:
    """Deterministic kernels, no TF32 (``True``), or cuDNN autotuning and TF32 for speed (``False``).
    ``CUBLAS_WORKSPACE_CONFIG`` must be in the environment before CUDA starts for cuBLAS to comply."""
    import torch

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


class SweepWorker:
    """One per GPU (or CPU slot): model + discriminator resident, batches of blocks in, manifest rows out."""

    def __init__(self, plan: "SweepPlan | dict[str, Any]", url: str, num_threads: int | None = None,
                 generation: str | None = None, module: Any = None) -> None:
        """``plan``: the sweep's plan (the driver's ``resolve``; the worker derives nothing again), or
        a job spec document, whose plan is then resolved against the store at ``url``. ``module``: the
        caller's own nn.Module when the spec names one (``model: {module: ...}``), or the name of the
        dispatcher's ``ModuleHolder`` actor that keeps it."""
        from ldam_sweep.planning import SweepPlan
        from ldam_sweep.spec import parse_job

        t0 = time.perf_counter()
        job_doc = None if isinstance(plan, SweepPlan) else plan
        self.plan: SweepPlan | None = plan if isinstance(plan, SweepPlan) else None
        self.job = plan.job if isinstance(plan, SweepPlan) else parse_job(plan)
        set_determinism(self.job.resources.deterministic)  # before CUDA starts

        import torch
        import zarr

        from ldam_sweep.model import load_model
        from ldam_sweep.model.loading import default_device
        from ldam_sweep.store import BlockWriter
        from ldam_sweep.store.transport import StoreIO

        threads = max(1, int(num_threads or 1))
        if num_threads:
            # torch's pool serves the device phase, zarr's the host phase: at most one of each busy
            torch.set_num_threads(threads)
            zarr.config.set({"threading.max_workers": threads})
        failpoints.worker_started()
        failpoints.hit("worker.start")
        # every step on the store is retried while the store does not answer (the sweep's patience)
        self.io = StoreIO(url, self.job.resources.storage_patience)
        self.device = default_device()
        t1 = time.perf_counter()
        if self.job.model.module:
            if module is None:
                from ldam_sweep.errors import ModelError

                raise ModelError(f"the sweep's model {self.job.model.module!r} is a live module: the worker needs it")
            if isinstance(module, str):  # the name of the dispatcher's ModuleHolder actor (cluster/dispatch.py)
                import ray
                from ray import cloudpickle

                module = cloudpickle.loads(ray.get(ray.get_actor(module).get.remote()))
            self.model = load_model(module, input=self.job.model.input, device=self.device)
        else:
            self.model = load_model(self.job.model, device=self.device)
        t2 = time.perf_counter()
        if self.plan is None:  # used on its own (tests, benchmarks): the plan of the store at url
            from ldam_sweep.planning import resolve
            from ldam_sweep.store.layout import read_sampler_revision

            self.writer = self.io("opening the store", BlockWriter, url)
            self.plan = resolve(self.job, self.model, job_doc).with_store(self.writer.plan).with_revision(
                self.io("reading the store", read_sampler_revision, url))
        else:
            self.writer = self.io("opening the store", BlockWriter, url, plan=self.plan.store)  # refuses another plan's store
        self.sampler = self.plan.sampler
        self.url = url
        self.generation = generation  # the store this worker was started for; None: not checked
        self.discriminator_digest: str | None = None  # the loaded discriminator's, stamped into the rows
        self._discriminator = None
        self.prior_digest: str | None = None  # the loaded score prior's (method walk), stamped into the rows
        self._prior = None
        self._device_lock = threading.Lock()  # one batch on the device at a time
        self._block_writers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="block-writer")
        self.node = self._node_id()
        self.max_batch: int | None = None  # learnt after an out-of-memory split
        self._load_real_data()
        t3 = time.perf_counter()
        self.batch_units = {lp.name: self._choose_batch_units(lp) for lp in self.plan.store.layers}
        # where a worker's start-up goes (the sweep summary reports the first worker's)
        self.startup = {"imports_s": t1 - t0, "model_s": t2 - t1, "store_and_data_s": t3 - t2,
                        "batch_probe_s": time.perf_counter() - t3}

    def _load_real_data(self) -> None:
        """The real pool (exemplars, the preconditioner, nearest-real distances, labels), once."""
        import torch

        self.real_pool = None  # real images for exemplars, the preconditioner, the nearest-real distance
        self.real_hf = None  # their mean high-frequency energy (hf_ratio)
        self.preconditioner = None  # ldam's, fitted once from the real pool
        self.pool_labels = self.data_classes = None  # the real pool's class indices and names (labelled data)
        self.observer = None  # the 2-AFC observer over held-out query images (informativeness scores)
        if self.job.data is None:
            return
        from ldam_sweep.data import real_data_and_queries
        from ldam_sweep.sampling.observer import Observer, query_subset
        from ldam_sweep.sampling.realism import hf_energy

        (images, self.pool_labels, self.data_classes), held_out = real_data_and_queries(self.job.data, self.model.input)
        queries = query_subset(held_out)
        self.observer = Observer(torch.from_numpy(queries)) if len(queries) else None
        self.real_pool = torch.from_numpy(images)
        self.real_hf = float(hf_energy(self.real_pool, self.model.input.range).mean())
        if self.sampler.method == "ldam":
            from ldam_sweep.sampling.precondition import fit_preconditioner

            self.preconditioner = fit_preconditioner(self.real_pool, self.sampler.options.precondition,
                                                     device=self.device)

    @staticmethod
    def _node_id() -> str:
        try:
            import ray

            if ray.is_initialized():  # get_runtime_context() would otherwise start a local Ray
                return ray.get_runtime_context().get_node_id()[:12]
        except Exception:
            pass
        return "local"

    def identity(self) -> dict[str, Any]:
        """Who this worker is, and how many units it samples per batch in each layer."""
        return {"pid": os.getpid(), "node": self.node, "host": socket.gethostname(), "device": str(self.device),
                "batch_units": dict(self.batch_units), "niceness": os.nice(0), "startup": dict(self.startup)}

    def discriminator(self):
        if self.job.discriminator is None:
            return None
        if self._discriminator is None:
            from ldam_sweep.sampling.discriminator import load_discriminator

            blob, self.discriminator_digest = self._frozen_from_store("discriminator")
            self._discriminator = load_discriminator(blob, self.model).module.to(self.device)
        return self._discriminator

    def prior(self):
        """``walk``'s score prior, read from the store once (checked against its record's sha256)."""
        if self.job.prior is None:
            return None
        if self._prior is None:
            from ldam_sweep.sampling.prior import load_score_prior

            blob, self.prior_digest = self._frozen_from_store("prior")
            self._prior = load_score_prior(blob).to(self.device)
        return self._prior

    def _frozen_from_store(self, name: str) -> tuple[bytes, str | None]:
        """(bytes, digest) of the frozen model stage 1 kept in the store's group ``name`` (discriminator,
        prior), its bytes checked against its record's sha256."""
        from ldam_sweep.store import open_store
        from ldam_sweep.store.integrity import FROZEN

        st = self.io("opening the store", open_store, self.url)
        blob = self.io(f"reading the {FROZEN[name]}", getattr(st, f"{name}_bytes"))
        if blob is None:
            raise RuntimeError(f"store {self.url!r} holds no {FROZEN[name]} yet (stage 1 did not finish)")
        return blob, (getattr(st, f"{name}_info")() or {}).get("digest")

    def _sample_kwargs(self, layer: str, steps: int | None = None) -> dict[str, Any]:
        import torch

        kwargs = self.sampler.kwargs()  # parsed once, for the store's sampler revision (SweepPlan)
        kwargs["ladder"] = self.plan.store.ladder  # the rungs the store keeps (sampler.ladder is in its spec)
        if steps:  # the memory probe: a few steps, default snapshots, no ladder
            kwargs.update(steps=steps, snapshot_every=None, ladder=())
        if self.sampler.method == "ldam":
            kwargs["preconditioner"] = self.preconditioner
        if self.sampler.method == "walk":
            kwargs["prior"] = self.prior()
        return dict(kwargs, discriminator=self.discriminator(), objective=self.plan.store.layer(layer).objective,
                    snapshot_dtype=torch.float32 if self.plan.store.pixels == "float32" else torch.float16)

    def _choose_batch_units(self, lp: Any) -> int:
        """Units per batch for a layer: one block with an explicit block size; with ``auto``,
        CPU_BATCH_UNITS on a CPU, and on a GPU the largest multiple of the grid whose probed
        memory fits the free memory with headroom; capped at the layer's planned units and at
        BATCH_SAMPLE_BYTES of stored samples."""
        import numpy as np
        import torch

        grid = lp.block_size
        if self.job.resources.block_size != "auto":
            return grid
        store = self.plan.store
        unit_bytes = 2 * store.chains * len(store.snapshot_steps) * int(np.prod(self.model.input.shape))
        cap = min(-(-lp.planned_units() // grid) * grid, max(grid, BATCH_SAMPLE_BYTES // unit_bytes // grid * grid))
        if self.device.type != "cuda":
            return max(grid, min(CPU_BATCH_UNITS // grid * grid, cap))
        if cap <= grid:  # the layer is one block, or one block is as large as a batch may be
            return grid
        try:
            per_unit = self._probe_bytes_per_unit(lp)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return grid
        free, _ = torch.cuda.mem_get_info(self.device)
        share = self.job.resources.gpus_per_actor
        share = float(share) if share != "auto" and float(share) < 1 else 1.0  # actors sharing one GPU
        fit = int(free * GPU_MEMORY_HEADROOM * share // per_unit) // grid * grid
        return max(grid, min(fit, cap))

    def _probe_kwargs(self, layer: str, n: int) -> dict[str, Any]:
        """``sample()``'s arguments for the memory probe of ``n`` units: a few steps, and real starts
        where the run has them (``walk`` refuses any other): the first real images stand in for
        each unit's exemplars."""
        from ldam_sweep.sampling.chains import SAMPLING_EXEMPLARS

        kwargs = self._sample_kwargs(layer, steps=PROBE_STEPS)
        if self.sampler.starts_from_exemplars and self.real_pool is not None:
            first = self.real_pool[:SAMPLING_EXEMPLARS].to(self.device)
            kwargs["exemplars"] = first.unsqueeze(0).expand(n, *first.shape)
        return kwargs

    def _probe_bytes_per_unit(self, lp: Any) -> float:
        """Peak device bytes one more unit costs: a few steps at PROBE_UNITS and twice that (the
        difference leaves out fixed costs), plus the snapshots the real run keeps (float32 on the
        device, and their float16 copy on the way out), which a short probe does not; or the
        scores' use of the snapshots, when that is larger."""
        import numpy as np
        import torch

        from ldam_sweep.sampling import sample
        from ldam_sweep.settings import default_snapshot_steps

        peaks = []
        for n in (PROBE_UNITS, 2 * PROBE_UNITS):
            probe = list(range(n))  # the layer has more units than one block (> 2 * PROBE_UNITS)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            sample(self.model, lp.name, probe, **self._probe_kwargs(lp.name, n))
            peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
        torch.cuda.empty_cache()
        per_unit = (peaks[1] - peaks[0]) / PROBE_UNITS
        if per_unit <= 0:
            per_unit = peaks[1] / (2 * PROBE_UNITS)
        chains, snaps = self.plan.store.chains, len(self.plan.store.snapshot_steps)
        probed = len(default_snapshot_steps(PROBE_STEPS, None))
        image = int(np.prod(self.model.input.shape))
        sampling = per_unit + chains * image * (4 * max(0, snaps - probed) + 2 * snaps)
        scoring = chains * image * 16 * snaps  # float16 in, float32 copy, float64 differences for movement
        return max(sampling, scoring)

    def _sample(self, layer: str, units: list[int], exemplars=None):
        """Sample units in one batch; on out-of-memory, in halves (chains are per-unit reproducible,
        so the parts give what one batch would, up to a GPU kernel's batch-size-dependent rounding).
        ``exemplars`` (U, N, ...): chain starts. Returns the result and, per unit, the live units of
        the batch that sampled it (what ``sample(batch_units=...)`` needs to reproduce it on a GPU)."""
        import torch

        from ldam_sweep.sampling import ChainResult, sample

        kwargs = self._sample_kwargs(layer)
        parts = [units] if not self.max_batch else [units[i : i + self.max_batch] for i in range(0, len(units), self.max_batch)]
        results, sizes = [], {}
        while parts:
            part = parts.pop(0)
            ex = None if exemplars is None else exemplars[[units.index(u) for u in part]]
            try:
                res = sample(self.model, layer, part, exemplars=ex, **kwargs)
                results.append(res)
                sizes.update(dict.fromkeys(part, len(part) - int(0 if res.dead is None else res.dead.sum())))
            except torch.OutOfMemoryError:
                if len(part) == 1:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                half = len(part) // 2
                self.max_batch = half
                parts[:0] = [part[:half], part[half:]]
        return ChainResult.concat(results), sizes

    def _device_phase(self, layer: str, units: list[int]):
        """Exemplars, sampling and scores of the batch (tensor math on the model's device). ``ldam``
        starts each chain from one of its unit's best real images, so exemplars come first; the
        same pass gives each unit's activation distribution over the pool and its label."""
        import numpy as np

        from ldam_sweep.sampling.chains import SAMPLING_EXEMPLARS
        from ldam_sweep.sampling.exemplars import LABEL_K, exemplar_pass, unit_label_columns
        from ldam_sweep.sampling.scoring import score_result

        k = self.plan.store.exemplars_k
        ldam = self.sampler.starts_from_exemplars  # ldam from revision 2: starts and targets from real exemplars
        found = None
        if self.real_pool is not None:  # exemplars, labels and distributions: one pass over the pool
            objective = self.plan.store.layer(layer).objective
            found = exemplar_pass(self.model, layer, np.asarray(units), objective, self.real_pool,
                                  max(k, LABEL_K, SAMPLING_EXEMPLARS if ldam else 0), labels=self.pool_labels,
                                  class_names=self.data_classes, label_k=k or LABEL_K)
        result, sizes = self._sample(layer, units, found.images if ldam and found is not None else None)
        exemplars = (found.images[:, :k], found.activations[:, :k]) if k and found is not None else None
        scores = score_result(self.model, result, real_pool=self.real_pool, real_hf=self.real_hf,
                              exemplar_max=None if exemplars is None else exemplars[1][:, 0],
                              exemplars=None if exemplars is None else exemplars[0])
        if self.observer is not None:  # informativeness: what the images shown tell about the unit
            from ldam_sweep.sampling.observer import observer_columns

            for u, columns in observer_columns(self.model, layer, self.plan.store.layer(layer).objective, result,
                                               None if exemplars is None else exemplars[0], self.observer,
                                               real_starts=bool(ldam and found is not None)).items():
                scores.setdefault(u, {}).update(columns)
        for u, columns in unit_label_columns(self.model, result, found).items():  # dead units: the pool's only
            scores[u] = {**scores.get(u, {}), **columns}
        return result, exemplars, scores, sizes

    def run_batch(self, layer: str, blocks: list[tuple[int, list[int]]], attempts: list[int]) -> list[list[dict[str, Any]]]:
        """Sample the blocks' units (one layer) as one batch, write each block's region, return each
        block's manifest rows. The device phase holds the device lock; the writes do not."""
        for block, _ in blocks:
            failpoints.block_starts(layer, block)
        from ldam_sweep.store.writer import default_worker_id

        units = [u for _, block_units in blocks for u in block_units]
        with self._device_lock:
            failpoints.sampling_started(layer, [b for b, _ in blocks])
            t0 = time.perf_counter()
            result, exemplars, scores, sizes = self._device_phase(layer, units)
            seconds = time.perf_counter() - t0
        worker = f"{default_worker_id()}@{self.node}"

        def write(i: int) -> list[dict[str, Any]]:
            block, block_units = blocks[i]
            lo = sum(len(b) for _, b in blocks[:i])
            part = slice(lo, lo + len(block_units))
            failpoints.before_block_write(layer, [b for b, _ in blocks])
            sub = result.take(part)
            columns = {u: {**scores.get(u, {}), "batch_units": sizes[u], "discriminator": self.discriminator_digest,
                           "prior": self.prior_digest}
                       for u in block_units}  # dead units: no scores

            def write_once() -> list[dict[str, Any]]:  # idempotent: whole objects, deleted then written
                self._check_generation(layer, block, "wrote nothing")
                rows = self.writer.write(layer, block, sub, attempt=attempts[i],
                                         seconds=seconds * len(block_units) / len(units), worker=worker,
                                         exemplars=None if exemplars is None else (exemplars[0][part], exemplars[1][part]),
                                         unit_columns=columns)
                self._check_generation(layer, block, "its rows are not returned (verify the store)")
                return rows

            return self.io(f"writing block {layer}:{block}", write_once)

        if len(blocks) == 1:
            return [write(0)]
        return list(self._block_writers.map(write, range(len(blocks))))

    def _check_generation(self, layer: str, block: int, outcome: str) -> None:
        """The store is still the one this worker was started for (its root zarr.json's generation);
        a store deleted or recreated by another driver raises StoreReplacedError."""
        if self.generation is None:
            return
        from ldam_sweep.errors import StoreReplacedError
        from ldam_sweep.store.layout import read_generation

        now = read_generation(self.writer.loc)
        if now != self.generation:
            found = "no store" if now is None else f"generation {now or 'none'}"
            raise StoreReplacedError(
                f"store {self.url!r} was replaced while block {layer}:{block} ran (it started as generation "
                f"{self.generation or 'none'}, now {found}); this worker {outcome}")
