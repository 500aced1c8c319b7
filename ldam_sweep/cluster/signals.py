"""Stopping a sweep on a signal: Ctrl-C (SIGINT) and SIGTERM (what a scheduler, `ray job stop`, a
container runtime or a spot preemption sends) are handled alike, from the driver's first step to
its last.

One handler serves both signals for the whole of ``run_sweep``. It raises only inside *armed*
regions (the work: checks, stage 1, the dispatch loop, stage 3), and only once: the first signal
raises ``Interrupted`` there, or at the entry of the next armed region when it arrived outside one.
Everything that must finish once a stop is asked for -- the commit of finished blocks, stopping the
workers and Ray, releasing the lease -- runs outside armed regions, where a signal is only recorded:
it can never escape as a traceback or cut Ray's shutdown short. A second signal sets ``urgent``:
the commit of finished blocks is abandoned (it is one atomic write: it lands whole or not at all;
those blocks rerun next time) and the driver goes straight to stopping Ray.

Armed regions never nest and every one sits inside a ``try`` that handles ``KeyboardInterrupt``
(or lets it reach the CLI): a signal that lands as a region is entered or left is raised at that
point, which is still inside that ``try``. Handlers catch ``KeyboardInterrupt``, not only
``Interrupted``, and read the signal from ``StopSignals.name``: inside ``ray.wait``/``ray.get`` Ray
runs the handler itself and raises a plain ``KeyboardInterrupt`` in place of ours.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# the shell's convention, 128 + the signal's number: what a scheduler that sent SIGTERM expects back
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(KeyboardInterrupt):
    """The sweep was asked to stop by ``signum`` (SIGINT or SIGTERM). A KeyboardInterrupt, so code
    that already stops cleanly on Ctrl-C stops cleanly on SIGTERM too."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal_name(signum))

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "SIGINT"


def exit_code_of(err: BaseException) -> int:
    """The exit code a KeyboardInterrupt stands for: SIGTERM's 143, else Ctrl-C's 130."""
    return err.exit_code if isinstance(err, Interrupted) else 130


class _Armed:
    """``with signals.armed():`` -- see StopSignals.armed."""

    def __init__(self, owner: "StopSignals") -> None:
        self.owner = owner

    def __enter__(self) -> None:
        s = self.owner
        s._armed += 1
        if s.signum is not None and not s._raised:  # asked to stop while nothing could be interrupted
            s._raised = True
            raise Interrupted(s.signum)

    def __exit__(self, *exc: Any) -> None:
        self.owner._armed -= 1


class StopSignals:
    """SIGINT and SIGTERM handlers for one sweep (installed in the main thread only; elsewhere a
    no-op, and the caller's own handling applies). ``announce(text)`` prints what a second signal does."""

    def __init__(self, announce: Callable[[str], None] | None = None) -> None:
        self.announce = announce or (lambda _text: None)
        self.signum: int | None = None  # the first stop signal, once one came
        self.count = 0
        self.urgent = threading.Event()  # a second signal: stop at once
        self._armed = 0
        self._raised = False
        self._previous: dict[int, Any] = {}

    # -- installation -----------------------------------------------------------------------------
    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def install(self) -> None:
        """Handle both signals here (again: ``ray.init`` replaces SIGTERM's handler with its own,
        which calls sys.exit from wherever the driver happens to be)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self._handler)
            if previous is not self._handler:
                self._previous.setdefault(signum, previous)

    # -- state ------------------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal_name(self.signum)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum or signal.SIGINT, 130)

    def armed(self) -> _Armed:
        """A region where the first stop signal raises ``Interrupted`` (at once, or on entry when it
        came before). Use it around work, never around cleanup."""
        return _Armed(self)

    def _handler(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum
        if self.count == 2:
            self.urgent.set()
            self.announce(f"{signal_name(signum)} again: stopping now without committing the finished blocks "
                          "(they rerun next time); shutting Ray down")
        if self._armed and not self._raised:
            self._raised = True
            raise Interrupted(self.signum)

    def finish(self, step: Callable[[], T]) -> tuple[bool, T | None]:
        """Run a cleanup ``step`` that a second signal may skip (the commit of finished blocks):
        in a helper thread, waiting until it is done or ``urgent`` is set. (True, its result), or
        (False, None) when skipped; its exception is raised here."""
        if self.urgent.is_set():
            return False, None
        if threading.current_thread() is not threading.main_thread():
            return True, step()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = step()
            except BaseException as err:  # raised in the caller's thread below
                box["error"] = err

        worker = threading.Thread(target=run, name="ldam-sweep-finish", daemon=True)
        worker.start()
        while worker.is_alive():
            if self.urgent.wait(0.05):
                return False, None
        if "error" in box:
            raise box["error"]
        return True, box.get("result")
