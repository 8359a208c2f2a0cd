"""Turn SIGINT/SIGTERM/SIGUSR1/SIGUSR2 into "checkpoint at the next safe point, then stop", for the whole run.

The handler only sets a flag (a signal can arrive mid-step, when the state is half-updated); the loop
checks it after every step, and long work after the loop (final sample grid, FID) checks it between
batches (`check`). A second Ctrl-C stops at once (KeyboardInterrupt) — except inside `critical()`, the
writing of a checkpoint, which is finished first. After the trainer has saved what it has,
`resume_default()` hands the signal to whoever had it before us (submitit's requeue handler on SLURM)
or exits with 128 + signum.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)
SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None)) if s)


class StopRequested(Exception):
    """A signal asked the run to stop; raised at a safe point by `GracefulInterrupt.check`."""


class GracefulInterrupt:
    # False in DDP ranks started by rank 0 (dist.devices=N): rank 0 owns the signals and the ranks agree
    # on stopping through the process group (Trainer.stop_requested); those processes ignore signals.
    install_handlers = True

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._frame = None
        self._critical = 0
        self._forced_during_critical = False

    def __enter__(self) -> "GracefulInterrupt":
        if self.install_handlers and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            if self._critical:
                log.warning("second interrupt: finishing the checkpoint being written, then stopping")
                self._forced_during_critical = True
                return
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        log.warning("received %s: will checkpoint at the next safe point and stop", signal.Signals(signum).name)
        self.signum, self._frame = signum, frame

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise StopRequested if a signal arrived (call between units of long work)."""
        if self.signum is not None:
            raise StopRequested(signal.Signals(self.signum).name)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A block a second Ctrl-C must not cut (a checkpoint write); it stops right after instead."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self._forced_during_critical:
            self._forced_during_critical = False
            raise KeyboardInterrupt

    def resume_default(self) -> None:
        """After checkpointing: pass the signal on to the previous handler, or exit.

        On SLURM the previous handler is submitit's: for SIGUSR2 it pickles the job again (the
        launcher's `checkpoint()`), runs `scontrol requeue` and exits; for SIGTERM it only logs, and we
        exit 128+15. The requeued job reruns the same Hydra job in the same directory: resume=auto.
        """
        signum = self.signum
        previous = self._previous.get(signum)
        self.__exit__()
        if signum is None:  # DDP: another rank got the signal; this one just stops
            return
        if callable(previous) and previous not in (signal.default_int_handler,):
            previous(signum, self._frame)
        sys.exit(128 + signum)
