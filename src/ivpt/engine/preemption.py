"""Graceful preemption: SIGTERM or SIGUSR1 ends a run at the next step boundary with a checkpoint.

SLURM and Kubernetes send SIGTERM before killing a job (preemption, the end of its time), and SLURM
can send SIGUSR1 ahead of the time limit (``--signal=USR1@120``). ``StopRequest`` turns either
into a flag; the training loop checks it after every optimizer step, writes a checkpoint of that
exact step and raises ``Preempted``, which ``ivpt`` turns into exit code ``EXIT_PREEMPTED`` (75,
EX_TEMPFAIL: try again). ``--resume`` then continues from that step. Under torchrun the flag is
all-reduced every step, so every rank stops at the same step even if only one got the signal.
``ivpt tune --workers N`` passes a signal on to its workers and exits 75 once they have stopped; a
worker whose parent died (SIGKILL, out of memory) stops in the same way rather than training on.
"""
from __future__ import annotations

import base64
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch  # imported where used: ivpt.engine.study (which takes a stop request) opens no torch

EXIT_PREEMPTED = 75
SAME_STOP_SECONDS = 2.0  # signals this close together are one stop, not a second one that forces the end
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint; continue it with --resume."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


class StopRequest:
    """A context in which SIGTERM / SIGUSR1 set ``requested`` instead of ending the process.

    Contexts nest (a benchmark around a tuner around its trial loop around a run); a stop belongs to all of
    them: one opened while an enclosing one holds a request takes it over (a run started just after a
    signal stops after its first step), and a request a block did not answer with ``Preempted`` (one during
    a run's last evaluation, which finishes the run) goes back to the enclosing one, so no new run starts.
    A second signal ends the process as if no StopRequest caught it, unless it comes within
    SAME_STOP_SECONDS of the first. ``then(signum)``, where given, is called on every signal first: e.g. to
    pass it on to worker processes.
    """

    def __init__(self, then: Callable[[int], None] | None = None):
        self.signal: str | None = None
        self.then = then
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested and now - self._first_at < SAME_STOP_SECONDS:
            return  # one stop delivered twice: by a scheduler to every process of a job, and passed on by its parent
        if self.then is not None:
            self.then(signum)
        if self.requested:  # a second signal (e.g. during a long evaluation): act on it as if not caught
            signal.signal(signum, self._uncaught(signum))
            os.kill(os.getpid(), signum)
            return
        self.signal, self._first_at = signal.Signals(signum).name, now

    def _uncaught(self, signum: int):
        """The handler beneath every enclosing StopRequest (usually SIG_DFL)."""
        handler = self._previous.get(signum, signal.SIG_DFL)
        while (outer := _owner(handler)) is not None:
            handler = outer._previous.get(signum, signal.SIG_DFL)
        return handler

    def _take(self, other: "StopRequest") -> None:
        if not self.requested:
            self.signal, self._first_at = other.signal, other._first_at

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            for outer in filter(None, map(_owner, self._previous.values())):
                if outer.requested:
                    self._take(outer)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        previous = dict(self._previous)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        outer = _owner(previous.get(signal.Signals[self.signal])) if self.requested else None
        if outer is not None and not isinstance(exc, Preempted):  # not SIG_DFL: a finished `ivpt train` lives on
            outer._take(self)

    def agreed(self, ctx, device) -> bool:
        """Whether any process was asked to stop (one all-reduce per call under DDP)."""
        if not ctx.active:
            return self.requested
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _owner(handler) -> StopRequest | None:
    """The StopRequest whose handler ``handler`` is, if any."""
    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, StopRequest) else None


def encode_state(state: torch.Tensor) -> str:
    """A generator state (uint8 tensor) as text for a JSON checkpoint."""
    return base64.b64encode(state.numpy().tobytes()).decode()


def decode_state(text: str) -> torch.Tensor:
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, str]:
    """torch's CPU (and CUDA) generator states, as text."""
    import torch

    state = {"cpu": encode_state(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = encode_state(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, str]) -> None:
    import torch

    torch.set_rng_state(decode_state(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(decode_state(state["cuda"]))


class StepCheckpoints:
    """When to write a checkpoint inside an epoch: every ``every`` steps (0: never), and on a stop request."""

    def __init__(self, every: int, stopper: StopRequest, ctx, device):
        self.every, self.stopper, self.ctx, self.device = every, stopper, ctx, device

    def after_step(self, global_step: int, epoch_done: bool) -> str | None:
        """'stop' (checkpoint, then end the run), 'save' (checkpoint, go on) or None, after ``global_step`` steps."""
        if self.stopper.agreed(self.ctx, self.device):
            return "stop"
        if self.every and global_step % self.every == 0 and not epoch_done:  # the epoch's end checkpoints anyway
            return "save"
        return None
