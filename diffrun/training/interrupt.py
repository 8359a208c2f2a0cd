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
    # False in DDP ranks started by rank 0 (dist.devices=N): rank 0 owns the signals and the ranks agree
    # on stopping through the process group (Trainer.stop_requested); those processes ignore signals.
    install_handlers = True

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._frame = None

    def __enter__(self) -> "GracefulInterrupt":
        if self.install_handlers and threading.current_thread() is threading.main_thread():
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
