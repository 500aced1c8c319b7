"""Fault injection for the fault tests, all of it (the way etcd's gofail and TiKV's fail-rs work).

Product code calls a function of this module at a point where a real fault can strike (a process
killed mid-write, a disk that fills up, a worker that stalls or fails); it never reads a test
variable itself. Every call is a cheap no-op unless its environment variable is set in the process
(it is read at each call, so a test may set it for one call). Nothing else in ``ldam_sweep`` names a
test variable; tests import the names below.

Named points (``POINTS``), enabled together in ``LDAM_SWEEP_FAILPOINTS`` as ``name=action`` pairs
separated by ``;``. Product code calls ``hit("name")``. Actions: ``kill`` (SIGKILL this process:
nothing after the point runs, no cleanup), ``enospc`` (raise ``OSError(ENOSPC)`` as a full disk would).

Hooks (``HOOKS``), one variable each, for faults that need an argument or a rendezvous with the test:

- ``LDAM_SWEEP_TEST_KILL_AFTER=<array>`` -- ``after_array_written(name)``: the block writer SIGKILLs
  its process right after writing the block's region of that array (``samples``, ``activation``...).
- ``LDAM_SWEEP_TEST_NO_HEARTBEAT=1`` -- ``heartbeat_disabled()``: the driver takes the store's lease
  but never renews it (its lease goes stale while it runs).
- ``LDAM_SWEEP_TEST_FAIL_BLOCKS=layer:block,...`` -- ``block_starts(layer, block)``: a worker raises
  on every attempt of the named blocks.
- ``LDAM_SWEEP_TEST_SIGNAL_DIR=<dir>`` -- ``worker_started()``: each worker touches
  ``<dir>/worker-<pid>`` when it starts. With ``LDAM_SWEEP_TEST_HOLD_BLOCKS=layer:block,...`` as
  well, ``block_starts(layer, block)`` writes ``<dir>/held-<layer>-<block>`` (the worker's pid) and
  waits (at most ``HOLD_LIMIT_S``) for ``<dir>/release-<layer>-<block>`` before the block runs:
  tests act on events, not on timing.
- ``LDAM_SWEEP_TEST_WRITE_GATE=<dir>`` -- ``sampling_started(layer, blocks)`` touches
  ``<dir>/sampling-<layer>-<block>`` when a worker starts sampling a batch, and
  ``before_block_write(layer, blocks)`` waits (at most ``WRITE_GATE_TIMEOUT_S``) until a block
  outside the batch has started sampling: a worker that sampled and wrote strictly one after the
  other fails instead of committing.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterable

ENV = "LDAM_SWEEP_FAILPOINTS"

POINTS = {
    "discriminator.before-bytes": "stage 1: the discriminator's group exists, its bytes are not written yet",
    "discriminator.before-record": "stage 1: the discriminator's bytes are written, its record (the commit) is not",
    "prior.before-bytes": "stage 1: the score prior's group exists, its bytes are not written yet",
    "prior.before-record": "stage 1: the score prior's bytes are written, its record (the commit) is not",
    "repair.before-commit": "verify --repair: damaged files are set aside, the tombstone rows are not published yet",
    "metadata.before-root": "create_store: every group and array exists, the root's checksums and format are not written",
    "worker.start": "a worker's constructor, before it loads the model (enospc: a worker that can never start)",
}
ACTIONS = ("kill", "enospc")

KILL_AFTER_ENV = "LDAM_SWEEP_TEST_KILL_AFTER"
NO_HEARTBEAT_ENV = "LDAM_SWEEP_TEST_NO_HEARTBEAT"
FAIL_BLOCKS_ENV = "LDAM_SWEEP_TEST_FAIL_BLOCKS"
HOLD_BLOCKS_ENV = "LDAM_SWEEP_TEST_HOLD_BLOCKS"
SIGNAL_DIR_ENV = "LDAM_SWEEP_TEST_SIGNAL_DIR"
WRITE_GATE_ENV = "LDAM_SWEEP_TEST_WRITE_GATE"

HOOKS = {
    KILL_AFTER_ENV: "after_array_written: the block writer SIGKILLs itself after writing the named array",
    NO_HEARTBEAT_ENV: "heartbeat_disabled: the driver's lease is taken but never renewed",
    FAIL_BLOCKS_ENV: "block_starts: the named blocks (layer:block,...) raise on every attempt",
    HOLD_BLOCKS_ENV: "block_starts: the named blocks announce themselves in SIGNAL_DIR and wait for their release",
    SIGNAL_DIR_ENV: "worker_started / block_starts: the folder of worker-<pid>, held-* and release-* files",
    WRITE_GATE_ENV: "sampling_started / before_block_write: a block is written only once another batch samples",
}

HOLD_LIMIT_S = 600.0
WRITE_GATE_TIMEOUT_S = 300.0
_POLL_S = 0.05


# --- named points ------------------------------------------------------------------------------

def _enabled() -> dict[str, str]:
    text = os.environ.get(ENV, "")
    out = {}
    for item in filter(None, (p.strip() for p in text.split(";"))):
        name, _, action = item.partition("=")
        if name not in POINTS or action not in ACTIONS:
            raise ValueError(f"{ENV}: {item!r} is not NAME=ACTION with NAME one of {sorted(POINTS)} "
                             f"and ACTION one of {list(ACTIONS)}")
        out[name] = action
    return out


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hit(name: str) -> None:
    """Fail here if the point ``name`` is enabled; otherwise nothing."""
    assert name in POINTS, name
    if ENV not in os.environ:
        return
    action = _enabled().get(name)
    if action == "kill":
        _kill_self()
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"failpoint {name}")


# --- hooks -------------------------------------------------------------------------------------

def _named_blocks(env: str) -> set[str]:
    return {item.strip() for item in os.environ.get(env, "").split(",") if item.strip()}


def _wait_until(ready: Callable[[], bool], limit_s: float, timeout_message: str) -> None:
    """Poll ``ready`` (the test's file event) until it is true; RuntimeError after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(timeout_message)
        time.sleep(_POLL_S)


def after_array_written(name: str) -> None:
    """The block writer wrote its region of array ``name``: SIGKILL if ``KILL_AFTER_ENV`` names it."""
    if os.environ.get(KILL_AFTER_ENV) == name:
        _kill_self()


def heartbeat_disabled() -> bool:
    """True if the lease must never be renewed (``NO_HEARTBEAT_ENV`` set and not empty)."""
    return bool(os.environ.get(NO_HEARTBEAT_ENV))


def worker_started() -> None:
    """A worker started: touch ``<SIGNAL_DIR>/worker-<pid>`` if ``SIGNAL_DIR_ENV`` is set."""
    folder = os.environ.get(SIGNAL_DIR_ENV)
    if folder:
        (Path(folder) / f"worker-{os.getpid()}").touch()


def block_starts(layer: str, block: int) -> None:
    """A worker is about to run block ``layer:block``: raise if ``FAIL_BLOCKS_ENV`` names it; if
    ``HOLD_BLOCKS_ENV`` names it (and ``SIGNAL_DIR_ENV`` is set), announce it and wait for its release."""
    name = f"{layer}:{block}"
    if FAIL_BLOCKS_ENV in os.environ and name in _named_blocks(FAIL_BLOCKS_ENV):
        raise RuntimeError(f"injected failure for block {name} ({FAIL_BLOCKS_ENV})")
    folder = os.environ.get(SIGNAL_DIR_ENV)
    if not folder or name not in _named_blocks(HOLD_BLOCKS_ENV):
        return
    held = Path(folder) / f"held-{layer}-{block}"
    tmp = held.with_name(f".{held.name}.{os.getpid()}")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, held)  # atomic: a reader never sees an empty pid
    release = Path(folder) / f"release-{layer}-{block}"
    _wait_until(release.exists, HOLD_LIMIT_S,
                f"block {name} held for {HOLD_LIMIT_S:.0f}s without {release} ({HOLD_BLOCKS_ENV})")


def sampling_started(layer: str, blocks: Iterable[int]) -> None:
    """A worker starts sampling these blocks: touch ``<WRITE_GATE>/sampling-<layer>-<block>`` for each."""
    gate = os.environ.get(WRITE_GATE_ENV)
    if gate:
        for block in blocks:
            (Path(gate) / f"sampling-{layer}-{block}").touch()


def before_block_write(layer: str, blocks: Iterable[int]) -> None:
    """A block of this batch (``blocks``) is about to be written: with ``WRITE_GATE_ENV`` set, wait
    until a block outside the batch has started sampling (raise after ``WRITE_GATE_TIMEOUT_S``)."""
    gate = os.environ.get(WRITE_GATE_ENV)
    if not gate:
        return
    own = {f"sampling-{layer}-{b}" for b in blocks}
    _wait_until(lambda: any(p.name not in own for p in Path(gate).glob("sampling-*")), WRITE_GATE_TIMEOUT_S,
                f"{WRITE_GATE_ENV}: no other block started sampling within {WRITE_GATE_TIMEOUT_S:.0f}s "
                f"while {sorted(own)} waited to be written: sampling and writing did not overlap")
