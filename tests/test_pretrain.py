"""The default backbone's pretraining script: resumable, reproducible, recorded."""
import json

import pytest
import torch
from safetensors.torch import load_file

from ivpt.backbones import pretrain
from conftest import pretrain_args as args


def test_interrupted_pretraining_resumes_to_the_same_weights(cifar_tar, tmp_path, monkeypatch):
    full = pretrain.main(args(cifar_tar, tmp_path / "a"))
    real = pretrain.save_state
    calls = {"n": 0}

    def stop_after_first(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "save_state", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(args(cifar_tar, tmp_path / "b"))
    monkeypatch.setattr(pretrain, "save_state", real)
    resumed = pretrain.main(args(cifar_tar, tmp_path / "b"))
    a = load_file(str(tmp_path / "a" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["weights_sha256"] == full["weights_sha256"]
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["architecture"]["embed_dim"] == 32 and config["class_names"] == ["cat", "dog"]
    assert len(config["train_log"]) == 3 and 0 <= config["cifar10_test_top1"] <= 1
    assert config["data"]["sha256"] and config["recipe"]["seed"] == 0


def test_pretrain_rejects_nonsense(cifar_tar, tmp_path):
    with pytest.raises(SystemExit):
        pretrain.main(["--data", str(cifar_tar), "--out", str(tmp_path / "x"), "--epochs", "0"])
    with pytest.raises(SystemExit):
        pretrain.main(["--data", str(cifar_tar), "--out", str(tmp_path / "x"), "--warmup-epochs", "40"])


def test_resume_keeps_the_precision_the_run_began_in(tmp_path):
    from ivpt.engine.hardware import Precision

    bf16_here = Precision("auto", "bf16", "CPU with native bf16")
    kept = pretrain.resumed_precision("auto", bf16_here, "fp32", tmp_path)
    assert kept.used == "fp32" and "resumed" in kept.reason
    assert pretrain.resumed_precision("auto", bf16_here, None, tmp_path).used == "bf16"  # nothing recorded
    with pytest.raises(SystemExit, match="--precision bf16.*trained in fp32"):
        pretrain.resumed_precision("bf16", Precision("bf16", "bf16", "asked for"), "fp32", tmp_path)


def test_checkpoint_records_its_precision(cifar_tar, tmp_path, monkeypatch):
    real = pretrain.save_state

    def stop_after_first(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "save_state", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(args(cifar_tar, tmp_path / "b"))
    meta = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert meta["precision"] == "fp32" and meta["epoch"] == 1
