"""What the machine can do: the precision to compute in and the threads each process should use.

``precision: auto`` is bf16 autocast where the device computes bf16 natively (CUDA devices that
support it; CPUs with AVX512_BF16 or AMX), fp16 with a gradient scaler on CUDA devices without bf16,
and fp32 otherwise: on a CPU without native bf16, autocast emulates it and a training step ran 10x
slower than fp32 (docs/benchmarks.md). Threads: processes that share one machine divide its cores,
because two processes that each use every core slow each other down several times over.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_ENV = "IVPT_CPU_BF16"  # 1 / 0: override the CPU check (e.g. a CPU the check does not know)
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX-512 BF16, AMX) and aarch64 ("bf16")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (cheap: read once per process)."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return any(flag in _cpu_flags() for flag in _CPU_BF16_FLAGS)


def cuda_bf16(device: torch.device) -> bool:
    """Whether the run's own GPU computes bf16 natively: compute capability 8.0 (Ampere) or later, or ROCm.

    Not ``torch.cuda.is_bf16_supported()``: it also says yes where bf16 is only emulated (V100, T4), and
    it asks the current device, which is GPU 0 for a run on ``cuda:1``.
    """
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= (8, 0)


@dataclass(frozen=True)
class Precision:
    asked: str
    used: str         # fp32 | bf16 | fp16
    reason: str

    @property
    def grad_scaler(self) -> bool:
        return self.used == "fp16"

    def to_dict(self) -> dict:
        return {"asked": self.asked, "used": self.used, "reason": self.reason}


_WARNED: set[str] = set()


def resolve_precision(asked: str, device: torch.device, *, cpu_bf16=None, cuda_has_bf16=None,
                      field: str = "config field 'precision'") -> Precision:
    """The precision a run computes in; ``cpu_bf16`` / ``cuda_has_bf16`` override the hardware checks (tests);
    ``field``: what errors name (the recipe's field, or a command's flag)."""
    if asked not in PRECISIONS:
        raise ValueError(f"{field}: got {asked!r}, expected one of {', '.join(PRECISIONS)}")
    kind = device.type
    native_cpu = cpu_native_bf16() if cpu_bf16 is None else cpu_bf16
    if kind == "cuda":
        native_cuda = cuda_bf16(device) if cuda_has_bf16 is None else cuda_has_bf16
    if asked == "fp32":
        return Precision(asked, "fp32", "asked for")
    if asked == "fp16":
        if kind != "cuda":
            raise ValueError(f"{field}: fp16 needs a CUDA device; use auto, bf16 or fp32 here")
        return Precision(asked, "fp16", "asked for (with a gradient scaler)")
    if asked == "bf16":
        if kind == "cpu" and not native_cpu and "bf16" not in _WARNED:
            _WARNED.add("bf16")
            warnings.warn("precision bf16 on a CPU without native bf16 (no AVX512_BF16 or AMX): autocast emulates "
                          "it, which ran a training step about 10x slower than fp32 on such a CPU; precision: auto "
                          "picks fp32 here", stacklevel=2)
        return Precision(asked, "bf16", "asked for")
    if kind == "cuda":
        if native_cuda:
            return Precision(asked, "bf16", "CUDA device with native bf16")
        return Precision(asked, "fp16", "CUDA device without bf16: fp16 with a gradient scaler")
    if kind == "cpu" and native_cpu:
        return Precision(asked, "bf16", "CPU with native bf16 (AVX512_BF16 or AMX)")
    if kind == "cpu":
        return Precision(asked, "fp32", "CPU without native bf16 (no AVX512_BF16 or AMX): bf16 would be emulated")
    return Precision(asked, "fp32", f"{kind} device: fp32")


def machine_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a cgroup or taskset limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def processes_on_machine() -> int:
    """How many ivpt processes share this machine: torchrun's local world size, or IVPT_PROCESSES."""
    for key in ("IVPT_PROCESSES", "LOCAL_WORLD_SIZE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def configure_threads(threads: int | None = None, processes: int | None = None) -> int | None:
    """Set torch's intra-op threads for a process that shares the machine; returns the count set.

    An explicit ``threads`` wins; then OMP_NUM_THREADS (the user's own choice, left alone); then,
    when several processes share the machine, cores / processes. A single process is left as it is.
    torchrun sets OMP_NUM_THREADS=1 for every rank of a multi-process node unless the user set it, and
    its 1 cannot be told from a user's: under torchrun a 1 gets the share (``threads: 1`` forces one).
    """
    if threads:
        torch.set_num_threads(int(threads))
        return int(threads)
    processes = processes or processes_on_machine()
    omp = os.environ.get("OMP_NUM_THREADS")
    if omp and not (omp == "1" and os.environ.get("TORCHELASTIC_RUN_ID") and processes > 1):
        return None
    if processes <= 1:
        return None
    share = max(1, machine_cores() // processes)
    torch.set_num_threads(share)
    return share
