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
    finally:
        torch.set_num_threads(before)


def test_a_run_records_the_precision_it_used(tmp_path, monkeypatch):
    from test_engine import TINY, make_folder
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
    from test_engine import TINY, make_folder
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
