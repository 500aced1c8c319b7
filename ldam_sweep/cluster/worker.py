"""The resident worker: loads the model and discriminator once, then samples and writes blocks.

Plain Python (testable without Ray); the driver wraps it as a Ray actor. It never returns tensors:
a block's arrays go straight into the store and only its manifest rows go back to the driver.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any


# Test hooks (fault tests only). Blocks named in FAIL_BLOCKS_ENV ("layer:block,layer:block") raise on
# every attempt. With SIGNAL_DIR_ENV set, each worker writes <dir>/worker-<pid> when it starts, and a
# block named in HOLD_BLOCKS_ENV writes <dir>/held-<layer>-<block> (holding the worker's pid) and waits
# for <dir>/release-<layer>-<block> before it runs: tests act on events, not on timing.
FAIL_BLOCKS_ENV = "LDAM_SWEEP_TEST_FAIL_BLOCKS"
HOLD_BLOCKS_ENV = "LDAM_SWEEP_TEST_HOLD_BLOCKS"
SIGNAL_DIR_ENV = "LDAM_SWEEP_TEST_SIGNAL_DIR"
HOLD_LIMIT_S = 600.0


def _named_blocks(env: str) -> set[str]:
    return {item.strip() for item in os.environ.get(env, "").split(",") if item.strip()}


def _hold_if_asked(layer: str, block: int) -> None:
    """Test hook: announce that this block is running and wait (at most HOLD_LIMIT_S) for its release."""
    folder = os.environ.get(SIGNAL_DIR_ENV)
    if not folder or f"{layer}:{block}" not in _named_blocks(HOLD_BLOCKS_ENV):
        return
    held = Path(folder) / f"held-{layer}-{block}"
    tmp = held.with_name(f".{held.name}.{os.getpid()}")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, held)  # atomic: a reader never sees an empty pid
    release = Path(folder) / f"release-{layer}-{block}"
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not release.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"block {layer}:{block} held for {HOLD_LIMIT_S:.0f}s without {release} ({HOLD_BLOCKS_ENV})")
        time.sleep(0.05)


class SweepWorker:
    """One per GPU (or CPU slot): model + discriminator resident, blocks in, manifest rows out."""

    def __init__(self, job_doc: dict[str, Any], url: str, num_threads: int | None = None) -> None:
        import torch
        import zarr

        from ldam_sweep.model import load_model
        from ldam_sweep.model.loading import default_device
        from ldam_sweep.spec import parse_job
        from ldam_sweep.store import BlockWriter

        if num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
            zarr.config.set({"threading.max_workers": max(1, int(num_threads))})
        if os.environ.get(SIGNAL_DIR_ENV):
            (Path(os.environ[SIGNAL_DIR_ENV]) / f"worker-{os.getpid()}").touch()
        self.job = parse_job(job_doc)
        self.device = default_device()
        self.model = load_model(self.job.model, device=self.device)
        self.writer = BlockWriter(url)
        self.url = url
        self._discriminator = None
        self.node = self._node_id()
        self.max_batch: int | None = None  # learnt after an out-of-memory split
        self.real_pool = None  # real images for exemplars and the nearest-real distance
        if self.job.data is not None:
            from ldam_sweep.data import real_images

            self.real_pool = torch.from_numpy(real_images(self.job.data, self.model.input, "train"))

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
        return {"pid": os.getpid(), "node": self.node, "host": socket.gethostname(), "device": str(self.device)}

    def discriminator(self):
        if self.job.discriminator is None:
            return None
        if self._discriminator is None:
            from ldam_sweep.sampling.discriminator import load_discriminator
            from ldam_sweep.store import open_store

            blob = open_store(self.url).discriminator_bytes()
            if blob is None:
                raise RuntimeError(f"store {self.url!r} holds no discriminator yet (stage 1 did not finish)")
            self._discriminator = load_discriminator(blob, self.model).module.to(self.device)
        return self._discriminator

    def _sample(self, layer: str, units: list[int], exemplars=None):
        """Sample units in one batch; on out-of-memory, in halves (chains are per-unit reproducible,
        so the parts give exactly what one batch would). ``exemplars`` (U, N, ...): chain starts."""
        import torch

        from ldam_sweep.sampling import sample
        from ldam_sweep.sampling.parts import concat_results

        s = self.job.sampler
        kwargs = dict(chains=s.chains, steps=s.steps, method=s.method, seed=s.seed, lam=s.lam,
                      discriminator=self.discriminator(), snapshot_every=s.snapshot_every,
                      objective=self.writer.plan.layer(layer).objective, init=s.init or "auto", **s.options)
        parts = [units] if not self.max_batch else [units[i : i + self.max_batch] for i in range(0, len(units), self.max_batch)]
        results = []
        while parts:
            part = parts.pop(0)
            ex = None if exemplars is None else exemplars[[units.index(u) for u in part]]
            try:
                results.append(sample(self.model, layer, part, exemplars=ex, **kwargs))
            except torch.OutOfMemoryError:
                if len(part) == 1:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                half = len(part) // 2
                self.max_batch = half
                parts[:0] = [part[:half], part[half:]]
        return concat_results(results)

    def run_block(self, layer: str, block: int, units: list[int], attempt: int) -> list[dict[str, Any]]:
        """Sample the block's units as one batch, write its region, return its manifest rows."""
        if f"{layer}:{block}" in _named_blocks(FAIL_BLOCKS_ENV):
            raise RuntimeError(f"injected failure for block {layer}:{block} ({FAIL_BLOCKS_ENV})")
        _hold_if_asked(layer, block)
        import numpy as np

        from ldam_sweep.sampling.chains import SAMPLING_EXEMPLARS
        from ldam_sweep.sampling.exemplars import top_exemplars
        from ldam_sweep.sampling.scoring import score_result
        from ldam_sweep.store.writer import default_worker_id

        t0 = time.perf_counter()
        k = self.writer.plan.exemplars_k
        ldam = self.job.sampler.method == "ldam"  # ldam starts from real exemplars and sizes its repulsion by them
        found = None
        if (k or ldam) and self.real_pool is not None:
            objective = self.writer.plan.layer(layer).objective
            found = top_exemplars(self.model, layer, np.asarray(units), objective, self.real_pool,
                                  max(k, SAMPLING_EXEMPLARS if ldam else 0))
        result = self._sample(layer, units, found[0] if ldam and found is not None else None)
        exemplars = (found[0][:, :k], found[1][:, :k]) if k and found is not None else None
        scores = score_result(self.model, result, real_pool=self.real_pool,
                              exemplar_max=None if exemplars is None else exemplars[1][:, 0])
        seconds = time.perf_counter() - t0
        return self.writer.write(layer, block, result, attempt=attempt, seconds=seconds, exemplars=exemplars,
                                 unit_columns=scores, worker=f"{default_worker_id()}@{self.node}")


