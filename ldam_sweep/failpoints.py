"""Named fault points for the fault tests (the way etcd's gofail and TiKV's fail-rs work).

Product code calls ``hit("name")`` at a point where a real fault can strike (a process killed just
before a write, a disk that fills up); the call does nothing unless the point is enabled in the
environment variable ``LDAM_SWEEP_FAILPOINTS`` of the process, as ``name=action`` pairs separated by
``;``. Actions: ``kill`` (SIGKILL this process: nothing after the point runs, no cleanup),
``enospc`` (raise ``OSError(ENOSPC)`` as a full disk would). Every point is listed here.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "LDAM_SWEEP_FAILPOINTS"

POINTS = {
    "discriminator.before-bytes": "stage 1: the discriminator's group exists, its bytes are not written yet",
    "discriminator.before-record": "stage 1: the discriminator's bytes are written, its record (the commit) is not",
    "repair.before-commit": "verify --repair: damaged files are set aside, the tombstone rows are not published yet",
    "metadata.before-root": "create_store: every group and array exists, the root's checksums and format are not written",
}
ACTIONS = ("kill", "enospc")


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


def hit(name: str) -> None:
    """Fail here if the point ``name`` is enabled; otherwise nothing."""
    assert name in POINTS, name
    if ENV not in os.environ:
        return
    action = _enabled().get(name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"failpoint {name}")
