"""The atlas's unit pages rendered by Ray tasks (``build_atlas(..., workers=N)``, ``ldam-sweep atlas -j N``).

Each task takes a few blocks of one layer and opens the store itself (a local path or an object
store every node reaches). A task that sees the atlas folder (the same machine, or a filesystem
the nodes share: it finds the token this build wrote there) renders its units straight into it;
each unit's files are its own, so tasks never write the same file. A task on a node without that
folder renders into a temporary folder and returns the files as bytes, which this process writes.
So the tasks may run on any node of a cluster (``address``). Returning the files cost a third of
the speed-up on 2 cores (the driver copying ~190 kB a unit out of Ray's object store and writing
it while both workers render). At most two tasks per worker are in flight, so memory stays
bounded by what they return.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

from ldam_sweep.atlas.format import slug
from ldam_sweep.errors import LdamError
from ldam_sweep.store.query import SweepStore, open_store

Job = tuple[str, int, list[dict[str, Any]]]
BLOCKS_PER_TASK_UNITS = 64  # a task renders whole blocks, about this many units


WRITER_TOKEN = ".atlas-build"  # in the atlas folder while a parallel build runs: its random token


def _render_task(render: Callable, url: str, storage_options: dict | None, jobs: list[Job],
                 out: str, token: str) -> tuple[int, dict, list[tuple[str, bytes]]]:
    """In a Ray worker: ``render`` (``site.render_blocks``) ``jobs``; (units rendered, corrupt units,
    files). Into ``out`` itself when this node sees it (its token file holds ``token``): no files
    returned; else into a temporary folder, whose files are returned."""
    st = open_store(url, storage_options)
    try:
        shared = (Path(out) / WRITER_TOKEN).read_text() == token
    except OSError:
        shared = False
    if shared:
        rendered, corrupt = render(st, jobs, Path(out))
        return rendered, corrupt, []
    with tempfile.TemporaryDirectory(prefix="ldam-atlas-") as tmp:
        rendered, corrupt = render(st, jobs, Path(tmp))
        files = [(str(p.relative_to(tmp)), p.read_bytes()) for p in Path(tmp).rglob("*") if p.is_file()]
    return rendered, corrupt, files


def _tasks(jobs: list[Job]) -> list[list[Job]]:
    """Jobs grouped into tasks of about BLOCKS_PER_TASK_UNITS units, never across layers."""
    tasks: list[list[Job]] = []
    units = 0
    for job in jobs:
        if not tasks or units + len(job[2]) > BLOCKS_PER_TASK_UNITS or tasks[-1][0][0] != job[0]:
            tasks.append([])
            units = 0
        tasks[-1].append(job)
        units += len(job[2])
    return tasks


def render_in_parallel(render: Callable, st: SweepStore, jobs: list[Job], out: Path, *, workers: int,
                       address: str | None = None) -> tuple[int, dict[tuple[str, int], str]]:
    """``render`` (``site.render_blocks``) over Ray: (units rendered, {(layer, unit): why} for corrupt blocks). Joins
    the Ray this process already runs, else ``address``, else starts a local one of ``workers`` CPUs
    (and stops it after)."""
    import ray

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_worker_niceness", "0")  # as the sweep's local Ray: tasks at normal priority
        try:
            if address:
                ray.init(address=address, namespace="ldam-sweep", log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(address="local", num_cpus=workers, include_dashboard=False, namespace="ldam-sweep",
                         log_to_driver=False, logging_level=logging.ERROR)
        except Exception as err:
            raise LdamError(f"cannot start or join Ray for the atlas (address {address or 'local'!r}): "
                            f"{type(err).__name__}: {str(err).strip()[:300]}") from None
        started = True
    token_file = out / WRITER_TOKEN
    token = uuid.uuid4().hex
    try:
        token_file.write_text(token)
        remote = ray.remote(num_cpus=1, max_retries=2)(_render_task)
        opts = st.loc.storage_options if not st.loc.is_local else None
        pending = _tasks(jobs)[::-1]
        running: list[Any] = []
        rendered, corrupt = 0, {}
        while pending or running:
            while pending and len(running) < 2 * workers:
                running.append(remote.remote(render, st.loc.url, opts, pending.pop(), str(out.resolve()), token))
            done, running = ray.wait(running, num_returns=1)
            n, bad, files = ray.get(done[0])
            rendered += n
            for (layer, unit), why in bad.items():
                corrupt[(layer, unit)] = why
                for stale in (out / "img" / slug(layer)).glob(f"{unit}-*.png"):  # never show the old data's images
                    stale.unlink()
            for rel, data in files:
                path = out / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        return rendered, corrupt
    finally:
        token_file.unlink(missing_ok=True)
        if started:
            ray.shutdown()
