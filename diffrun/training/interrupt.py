"""Turn SIGINT/SIGTERM/SIGUSR1/SIGUSR2 into "checkpoint at the next step boundary, then stop".

The handler only sets a flag (a signal can arrive mid-step, when the state is half-updated). After
the trainer has checkpointed it calls `resume_default()`, which hands the signal to whoever had it
before us (submitit's requeue handler on SLURM) or exits with 128 + signum.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading

log = logging.getLogger(__name__)
SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None)) if s)


class GracefulInterrupt:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._frame = None

    def __enter__(self) -> "GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        log.warning("received %s: will checkpoint at the end of this step and stop", signal.Signals(signum).name)
        self.signum, self._frame = signum, frame

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def resume_default(self) -> None:
        """After checkpointing: pass the signal on to the previous handler, or exit."""
        signum = self.signum
        previous = self._previous.get(signum)
        self.__exit__()
        if callable(previous) and previous not in (signal.default_int_handler,):
            previous(signum, self._frame)
        sys.exit(128 + signum)
