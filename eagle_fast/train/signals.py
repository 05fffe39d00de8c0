"""Stopping a run cleanly on a signal: SIGTERM (slurm's preemption and time limit, `kill`) and
SIGUSR1 (what `#SBATCH --signal=USR1@90` sends some seconds before the deadline).

The handler only records the request; the loop finishes its optimizer step, the ranks agree on
stopping (`agree`: one all-reduce per step, on the device the collectives use, so every rank stops
after the same step even when only one was signalled), one checkpoint is written and the run
returns normally. A watchdog bounds the whole: if the process is still alive `timeout_s` after the
signal (a peer lost mid-save, a hung collective), it exits with status 1, `latest` still naming
the previous complete checkpoint. Handlers are installed for the duration of a training run and
the previous ones restored after it: importing this module changes nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """with StopSignals(timeout_s) as stop: ... stop.received is the signal's name once one came."""

    def __init__(self, timeout_s: float = 0.0, label: str = ""):
        self.timeout_s = timeout_s
        self.label = label  # "rank 3: " before its messages
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._pid = -1
        self._timer: threading.Timer | None = None

    def __enter__(self) -> StopSignals:
        # signal.signal works only in the main thread: a run started elsewhere keeps the defaults
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker: its parent stops it after the step
            return
        if self.received is not None:  # srun forwards the same signal again: already stopping
            return
        self.received = signal.Signals(signum).name
        print(
            f"{self.label}{self.received} received: finishing this optimizer step, then saving a checkpoint "
            f"and exiting",
            file=sys.stderr,
            flush=True,
        )
        if self.timeout_s > 0:
            self._timer = threading.Timer(self.timeout_s, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        print(
            f"{self.label}{self.received}: the run did not save and exit within {self.timeout_s:g} s "
            f"(stop_timeout_s); exiting with status 1, `latest` unchanged",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def agree(flag: bool, device: torch.device, world: int) -> bool:
    """True on every rank when `flag` is true on any (an all-reduce on `device`: the collectives'
    own, so NCCL needs no host round trip); `flag` itself on one process."""
    if world <= 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
