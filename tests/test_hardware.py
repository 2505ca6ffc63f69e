"""precision: auto and the division of cores between processes."""
import json

import pytest
import torch

from ivpt.engine import hardware
from ivpt.engine.hardware import configure_threads, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_precision_follows_the_hardware():
    assert resolve_precision("auto", CPU, cpu_bf16=False).used == "fp32"
    assert resolve_precision("auto", CPU, cpu_bf16=True).used == "bf16"
    on_old_gpu = resolve_precision("auto", CUDA, cuda_has_bf16=False)
    assert on_old_gpu.used == "fp16" and on_old_gpu.grad_scaler
    assert resolve_precision("auto", CUDA, cuda_has_bf16=True).used == "bf16"
    assert resolve_precision("fp32", CPU, cpu_bf16=True).used == "fp32"  # an explicit choice is kept
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="'precision'.*expected one of auto"):
        resolve_precision("fp8", CPU)


def test_explicit_bf16_on_an_emulating_cpu_warns_once(monkeypatch):
    monkeypatch.setattr(hardware, "_WARNED", set())
    with pytest.warns(UserWarning, match="without native bf16.*10x slower"):
        assert resolve_precision("bf16", CPU, cpu_bf16=False).used == "bf16"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_precision("bf16", CPU, cpu_bf16=False)  # once per process


def test_cpu_check_reads_the_flags_and_can_be_forced(monkeypatch):
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    monkeypatch.delenv(hardware.CPU_BF16_ENV, raising=False)
    assert not hardware.cpu_native_bf16()
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert hardware.cpu_native_bf16()
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "0")
    assert not hardware.cpu_native_bf16()


def test_threads_divide_the_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(hardware, "machine_cores", lambda: 8)
        assert configure_threads(processes=4) == 2 and torch.get_num_threads() == 2
        assert configure_threads(processes=16) == 1
        assert configure_threads(threads=3, processes=4) == 3 and torch.get_num_threads() == 3
        torch.set_num_threads(5)
        assert configure_threads(processes=1) is None and torch.get_num_threads() == 5  # one process: left alone
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert configure_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_threads() is None  # the user's own setting wins
        # torchrun exports OMP_NUM_THREADS=1 to the ranks of a multi-process node unless the user set it
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
        assert configure_threads() == 4 and torch.get_num_threads() == 4
        assert configure_threads(threads=1) == 1  # one thread per rank, asked in the recipe
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert configure_threads() is None  # another value is the user's
    finally:
        torch.set_num_threads(before)


def test_native_bf16_is_judged_on_the_runs_own_gpu(monkeypatch):
    """torch.cuda.is_bf16_supported() says yes where bf16 is emulated (V100, T4: capability 7.x) and asks
    the current device; auto precision must give fp16 with a scaler on an sm_70 GPU at cuda:1."""
    capability = {0: (8, 0), 1: (7, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # as torch says on both
    monkeypatch.setattr(torch.version, "hip", None)
    assert hardware.cuda_bf16(torch.device("cuda", 0)) and not hardware.cuda_bf16(torch.device("cuda", 1))
    assert hardware.cuda_bf16(torch.device("cuda"))  # no index: the current device (0)
    old = resolve_precision("auto", torch.device("cuda", 1))
    assert old.used == "fp16" and old.grad_scaler
    assert resolve_precision("auto", torch.device("cuda", 0)).used == "bf16"


def test_loader_settings_follow_each_split_and_worker_gpus_map_through_the_visible_list(monkeypatch):
    """Pinning is judged per split (a device-cached test split beside a host train split: pinning a CUDA
    tensor fails); a folder's trainval moves to the device with its parts; worker processes cannot read
    a split kept on the device; --devices entries index the GPUs this process sees."""
    from types import SimpleNamespace

    import numpy as np
    from torch.utils.data import ConcatDataset

    from ivpt.data.cache import CachedImages, NormalizeBatch
    from ivpt.engine.loop import input_cache, loader_workers, pins
    from ivpt.engine.study import visible_device

    def part(n):
        source = SimpleNamespace(root=".", items=[])
        return CachedImages(np.zeros((n, 3, 4, 4), dtype=np.uint8), np.zeros(n, dtype=np.int64), ["a"], norm, None,
                            source)

    norm = NormalizeBatch((0.5,) * 3, (0.2,) * 3)
    meta = torch.device("meta")  # stands in for a GPU: a tensor device other than the CPU
    joined = ConcatDataset([part(2), part(3)])
    joined.normalize_batch = norm
    on_device = input_cache(joined, "device", meta)
    assert isinstance(on_device, ConcatDataset) and all(p.images.device == meta for p in on_device.datasets)
    assert not pins(on_device, CUDA) and not pins(part(2).to_device(meta), CUDA)
    assert pins(joined, CUDA) and not pins(joined, CPU)
    with pytest.raises(ValueError, match="'workers': 2 loader processes cannot read a split kept on"):
        loader_workers("2", CUDA, on_device)
    assert loader_workers("2", CUDA, joined) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert [visible_device(d) for d in ("0", "1")] == ["4", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_device("1") == "1"


def test_a_run_records_the_precision_it_used(tmp_path, monkeypatch):
    from conftest import TINY_MINI as TINY, make_folder
    from safetensors.torch import save_file
    import timm

    from ivpt.engine.config import TrainConfig
    from ivpt.engine.loop import train

    folder = make_folder(tmp_path / "data", per_class=4)
    save_file(timm.create_model("vit_mini_patch4_32", **TINY).state_dict(), str(tmp_path / "b.safetensors"))
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "0")
    cfg = TrainConfig(backbone="vit_mini_patch4_32", backbone_options=TINY, weights=str(tmp_path / "b.safetensors"),
                      method="vpt-deep", method_options={"prompt_length": 2}, data={"kind": "folder", "root": str(folder)},
                      epochs=1, warmup_epochs=0, batch_size=4, precision="auto", device="cpu",
                      output=str(tmp_path / "run")).validate()
    results = train(cfg, quiet=True)
    assert results["precision"] == {"asked": "auto", "used": "fp32",
                                    "reason": "CPU without native bf16 (no AVX512_BF16 or AMX): bf16 would be emulated"}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["precision"]["used"] == "fp32"


def test_a_resume_that_would_compute_in_another_precision_is_refused(tmp_path, monkeypatch):
    from conftest import TINY_MINI as TINY, make_folder
    from safetensors.torch import save_file
    import timm

    from ivpt.engine.checkpoint import CheckpointError
    from ivpt.engine.config import TrainConfig
    from ivpt.engine.loop import train

    folder = make_folder(tmp_path / "data", per_class=4)
    save_file(timm.create_model("vit_mini_patch4_32", **TINY).state_dict(), str(tmp_path / "b.safetensors"))
    cfg = TrainConfig(backbone="vit_mini_patch4_32", backbone_options=TINY, weights=str(tmp_path / "b.safetensors"),
                      method="linear", data={"kind": "folder", "root": str(folder)}, epochs=1, warmup_epochs=0,
                      batch_size=4, precision="auto", device="cpu", output=str(tmp_path / "run")).validate()
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "0")
    train(cfg, quiet=True)
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "1")  # the same recipe on a machine with native bf16
    with pytest.raises(CheckpointError, match="trained in fp32, and precision 'auto' means bf16 on this machine"):
        train(cfg, resume=True, quiet=True)
