"""Graceful stop on SIGTERM / SIGINT: finish the current step, checkpoint, exit.

Inside ``GracefulStop()`` the signals only set a flag; the trainer polls ``requested`` between steps.
Schedulers (SLURM, Kubernetes) send SIGTERM before killing a job: the run then exits with 128 + 15 =
143 after its checkpoint, which they report as preemption. A second Ctrl-C aborts at once (the
previous checkpoint stays the newest; a half-written one is never picked up).
"""
from __future__ import annotations

import signal
import threading


class TrainingInterrupted(Exception):
    """Raised after the checkpoint is written; the entry point exits with ``exit_code``."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT:  # a second Ctrl-C: stop now, without the checkpoint
            raise KeyboardInterrupt

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
