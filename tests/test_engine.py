"""Training engine: resume = uninterrupted, DDP (gloo, 2 CPU processes) = 1 process, protocol, CLI."""
import errno
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

import ivpt
from ivpt import cli
from ivpt.engine import checkpoint as ckpt_module
from ivpt.engine.checkpoint import CheckpointError, load_checkpoint
from ivpt.engine.config import ConfigError, TrainConfig, load_config
from ivpt.engine.loop import train
from ivpt.engine.protocol import choose
from ivpt.engine.study import tune
from conftest import TINY_MINI as TINY, adapter_tensors, config, ddp_worker, free_port

def test_resume_after_interrupt_ends_like_an_uninterrupted_run(setup, monkeypatch):
    tmp_path, folder = setup
    full = train(config(tmp_path, folder, output=str(tmp_path / "full")), quiet=True)

    calls = {"n": 0}
    real_save = ckpt_module.save_checkpoint

    def interrupt_after_first_epoch(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr("ivpt.engine.loop.save_checkpoint", interrupt_after_first_epoch)
    cfg = config(tmp_path, folder, output=str(tmp_path / "split"))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, quiet=True)
    _, meta = load_checkpoint(tmp_path / "split")  # the last good checkpoint is loadable
    assert meta["epoch"] == 1
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, quiet=True)
    resumed = train(cfg, resume=True, quiet=True)
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "split")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda log: [{k: v for k, v in e.items() if k != "seconds"} for e in log]
    assert strip(resumed["log"]) == strip(full["log"])
    assert resumed["val"]["top1"] == full["val"]["top1"]


def test_eval_every_skips_evaluations_without_changing_training(setup, monkeypatch):
    tmp_path, folder = setup
    import ivpt.engine.loop as loop

    calls = []
    real_evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: calls.append(1) or real_evaluate(*a, **k))
    every = train(config(tmp_path, folder, output=str(tmp_path / "every")), quiet=True)
    assert len(calls) == 3  # one per epoch; the last one is the final evaluation, not run twice
    sparse = train(config(tmp_path, folder, eval_every=2, output=str(tmp_path / "sparse")), quiet=True)
    assert len(calls) == 3 + 2
    assert ["val_top1" in e for e in every["log"]] == [True, True, True]
    assert ["val_top1" in e for e in sparse["log"]] == [False, True, True]  # epoch 2, and always the last
    assert sparse["val"]["top1"] == sparse["log"][-1]["val_top1"] == every["val"]["top1"]
    a, b = adapter_tensors(tmp_path / "every"), adapter_tensors(tmp_path / "sparse")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="eval_every"):
        config(tmp_path, folder, eval_every=-1)


def test_resume_refuses_a_changed_config(setup):
    tmp_path, folder = setup
    train(config(tmp_path, folder, epochs=2), quiet=True)
    with pytest.raises(ValueError, match="config differs .* lr"):
        train(config(tmp_path, folder, epochs=2, lr=0.3), resume=True, quiet=True)


def test_training_learns_and_writes_everything(setup):
    tmp_path, folder = setup
    results = train(config(tmp_path, folder, epochs=4, test_split="val", label_smoothing=0.1, grad_clip=1.0,
                           accumulation=2, optimizer="adamw", lr=0.05, lr_scaling=False), quiet=True)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "results.json", "checkpoint.json",
                 "checkpoint-4.safetensors", "adapter/adapter.safetensors", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert results["val"]["top1"] == 1.0  # two colours: trivially separable once trained
    assert len(results["val"]["confusion_matrix"]) == 2 and sum(map(sum, results["val"]["confusion_matrix"])) == 8
    assert load_config(run / "config.yaml").lr == 0.05  # the saved effective config reloads
    # no checkpoint file left half-written
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


def test_ddp_two_processes_match_one_process(setup):
    tmp_path, folder = setup
    common = dict(epochs=2, method_options={"prompt_length": 3, "ar_gamma_init": 0.1}, lr=1.0)
    single = train(config(tmp_path, folder, output=str(tmp_path / "one"), **common), quiet=True)
    cfg = config(tmp_path, folder, output=str(tmp_path / "two"), **common)
    mp.start_processes(ddp_worker, args=(2, free_port(), cfg.to_dict(), str(tmp_path / "two.json")),
                       nprocs=2, join=True, start_method="spawn")
    two = json.loads((tmp_path / "two.json").read_text())
    from ivpt.engine.hardware import machine_cores

    for rank in (0, 1):  # each rank got its share of the cores, read back from inside the process
        threads = json.loads((tmp_path / f"two.json.rank{rank}").read_text())
        assert threads["threads"] == threads["inside"] == max(1, machine_cores() // 2)
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-5), key
    for one_entry, two_entry in zip(single["log"], two["log"]):
        assert one_entry["train_loss"] == pytest.approx(two_entry["train_loss"], abs=1e-5)
        assert one_entry["val_top1"] == two_entry["val_top1"]


def test_protocol_on_a_folder_dataset(setup):
    tmp_path, folder = setup
    for path in (folder / "val").rglob("*.png"):  # give the folder a test split too
        target = folder / "test" / path.relative_to(folder / "val")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    cfg = config(tmp_path, folder, epochs=1, warmup_epochs=0, protocol={"lrs": [2.0, 0.5], "wds": [0.0, 0.01],
                                                                         "seeds": [3]})
    summary = tune(cfg, tmp_path / "tune", pruner="none")
    assert len(summary["grid"]) == 4 and summary["seeds"] == [3]
    best = max(g["val_top1"] for g in summary["grid"])
    assert summary["chosen"]["val_top1"] == best
    final = json.loads((tmp_path / "tune" / "final" / "seed3" / "results.json").read_text())
    assert final["config"]["train_split"] == "trainval" and final["test"]["count"] == 8
    assert json.loads((tmp_path / "tune" / "summary.json").read_text())["test_mean"] == summary["test_mean"]
    # a choice made elsewhere on val: no grid runs, the final runs train at that lr and weight decay
    reused = tune(cfg, tmp_path / "reuse", pruner="none", chosen={"lr": 0.5, "weight_decay": 0.01, "from": "another run"})
    assert reused["grid"] == [] and reused["chosen"]["from"] == "another run"
    assert not (tmp_path / "reuse" / "grid").exists()
    final = json.loads((tmp_path / "reuse" / "final" / "seed3" / "results.json").read_text())
    assert (final["config"]["lr"], final["config"]["weight_decay"]) == (0.5, 0.01)
    with pytest.raises(ValueError, match="trained at lr 0.5"):  # finished at another choice: never reused silently
        tune(cfg, tmp_path / "reuse", pruner="none", chosen={"lr": 2.0, "weight_decay": 0.01})


def test_protocol_on_a_suite_task_reruns_nothing(tmp_path):
    torch.manual_seed(0)  # clevr-dist: rendered once into the session's test cache (conftest), shared with test_tune
    import timm

    save_file(timm.create_model("vit_mini_patch4_32", **TINY).state_dict(), str(tmp_path / "b.safetensors"))
    cfg = TrainConfig(backbone="vit_mini_patch4_32", backbone_options=TINY, weights=str(tmp_path / "b.safetensors"),
                      method="vpt-deep", method_options={"prompt_length": 1}, data={"kind": "suite", "task": "clevr-dist"},
                      epochs=1, warmup_epochs=0, batch_size=200, protocol={"lrs": [0.5, 0.1], "wds": [0.0], "seeds": [1, 2]},
                      output=str(tmp_path / "tune")).validate()
    summary = tune(cfg, tmp_path / "tune", pruner="none")
    assert summary["seeds"] == [1, 2] and len(summary["grid"]) == 2 and len(summary["test_top1"]) == 2
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "tune").rglob("results.json")}
    assert len(stamp) == 4
    again = tune(cfg, tmp_path / "tune", pruner="none")  # everything done: nothing retrained, same summary
    assert again["test_top1"] == summary["test_top1"]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


def test_choose_prefers_best_val_then_smaller_lr():
    runs = [{"config": {"lr": lr, "weight_decay": wd}, "val": {"top1": acc}}
            for lr, wd, acc in [(1.0, 0.0, 0.8), (0.1, 0.0, 0.8), (0.5, 0.01, 0.7)]]
    assert choose(runs) == {"lr": 0.1, "weight_decay": 0.0, "val_top1": 0.8}


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="'batch_size'"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match="'accumulation'.*divide"):
        TrainConfig(batch_size=10, accumulation=3).validate()
    with pytest.raises(ConfigError, match="'precision'"):
        TrainConfig(precision="fp8").validate()
    (tmp_path / "r.yaml").write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="r.yaml is not valid YAML"):
        load_config(tmp_path / "r.yaml")
    with pytest.raises(FileNotFoundError, match="recipe not found"):  # a missing file: exit 1
        load_config(tmp_path / "none.yaml")
    assert load_config(None, ["lr=0.5", "method_options.prompt_length=20", "data.task=dtd10"]).data["task"] == "dtd10"


def test_cli_train_eval_predict_params(setup, capsys):
    tmp_path, folder = setup
    recipe = tmp_path / "recipe.yaml"
    cfg = config(tmp_path, folder, epochs=2, test_split="val").to_dict()
    import yaml

    recipe.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(recipe), "--output", str(tmp_path / "cli")]) == 0
    assert cli.main(["eval", str(tmp_path / "cli" / "adapter"), "--split", "val",
                     "--output", str(tmp_path / "eval.json")]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert metrics["top1"] == results["val"]["top1"] and len(metrics["per_class_accuracy"]) == 2
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "cli" / "adapter"), "--multiscale"]) == 2  # segmentation only
    assert "--multiscale applies to segmentation" in capsys.readouterr().err
    assert cli.main(["predict", str(tmp_path / "cli" / "adapter"), str(folder / "val" / "class0"), "--top-k", "2",
                     "--output", str(tmp_path / "pred.json")]) == 0
    predictions = json.loads((tmp_path / "pred.json").read_text())
    assert predictions["skipped"] == [] and len(predictions["predictions"]) == 4
    assert predictions["predictions"][0]["top_k"][0]["label"] in ("class0", "class1")
    assert predictions["device"] == "cpu" and predictions["precision"] == "fp32"
    # bf16 autocast on request (a GPU user's fast path): recorded, and the scores close to fp32's
    assert cli.main(["predict", str(tmp_path / "cli" / "adapter"), str(folder / "val" / "class0"), "--top-k", "2",
                     "--device", "cpu", "--precision", "bf16", "--output", str(tmp_path / "pred_bf16.json")]) == 0
    low = json.loads((tmp_path / "pred_bf16.json").read_text())
    assert low["precision"] == "bf16"
    for a, b in zip(predictions["predictions"], low["predictions"]):
        scores = {t["label"]: t["score"] for t in a["top_k"]}
        assert all(abs(scores[t["label"]] - t["score"]) < 0.05 for t in b["top_k"])
    assert cli.main(["eval", str(tmp_path / "cli" / "adapter"), "--split", "val", "--precision", "bf16",
                     "--output", str(tmp_path / "eval_bf16.json")]) == 0
    evaluated_low = json.loads((tmp_path / "eval_bf16.json").read_text())
    assert evaluated_low["precision"]["used"] == "bf16" and metrics["precision"]["used"] == "fp32"
    assert abs(evaluated_low["loss"] - metrics["loss"]) < 0.05
    # an imperfect folder: the unreadable file is skipped with a warning, listed, and the exit code says so
    (folder / "val" / "class0" / "corrupt.png").write_bytes(b"\x89PNG broken")
    capsys.readouterr()
    assert cli.main(["predict", str(tmp_path / "cli" / "adapter"), str(folder / "val" / "class0"),
                     "--output", str(tmp_path / "pred2.json")]) == cli.EXIT_SKIPPED == 3
    partial = json.loads((tmp_path / "pred2.json").read_text())
    assert len(partial["predictions"]) == 4 and [s["image"] for s in partial["skipped"]] == [
        str(folder / "val" / "class0" / "corrupt.png")]
    assert "warning: skipped: cannot decode image" in capsys.readouterr().err
    assert cli.main(["predict", str(tmp_path / "cli" / "adapter"), str(folder / "val" / "class0"), "--strict"]) == 2
    assert cli.main(["eval", str(tmp_path / "cli" / "adapter"), "--split", "val", "--output",
                     str(tmp_path / "eval2.json")]) == 3
    evaluated = json.loads((tmp_path / "eval2.json").read_text())
    assert evaluated["count"] == 8 and evaluated["skipped"][0]["image"].endswith("corrupt.png")
    assert cli.main(["eval", str(tmp_path / "cli" / "adapter"), "--split", "val", "--strict"]) == 2
    (folder / "val" / "class0" / "corrupt.png").unlink()
    assert cli.main(["params", "--backbone", "vit_base_patch16_224", "--method", "ivpt"]) == 0
    assert "185978" in capsys.readouterr().out  # 92,160 prompts + 16,907 DA-gate + 11 AR + 76,900 head


@pytest.mark.parametrize("argv,message", [
    (["train", "--set", "lr=-1"], "config field 'lr'"),
    (["train", "--set", "method=vpt"], "unknown method 'vpt'"),
    (["train", "--set", "optimizer=adam"], "'optimizer'"),
    (["eval", "/nonexistent/adapter"], "adapter_config.json"),
    (["predict", "/nonexistent/adapter", "x.png"], "adapter_config.json"),
    # device and precision are checked before the adapter is read
    (["predict", "/nonexistent/adapter", "x.png", "--device", "cuda:7"], "device cuda:7: this machine has"),
    (["eval", "/nonexistent/adapter", "--device", "gpu"], "device 'gpu' is not a device name"),
    (["predict", "/nonexistent/adapter", "x.png", "--device", "cpu", "--precision", "fp16"],
     "--precision: fp16 needs a CUDA device"),
    (["eval", "/nonexistent/adapter", "--precision", "half"], "precision: got 'half', expected one of"),
])
def test_cli_bad_input_gives_a_clear_message(argv, message, capsys):
    assert cli.main(argv) != 0
    assert message in capsys.readouterr().err


def test_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(setup, monkeypatch, capsys):
    tmp_path, folder = setup
    real = ckpt_module.save_file
    calls = {"n": 0}

    def disk_full_on_second_save(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module, "save_file", disk_full_on_second_save)
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config(tmp_path, folder).to_dict()))
    assert cli.main(["train", str(recipe)]) == 1
    assert "disk full" in capsys.readouterr().err
    _, meta = load_checkpoint(tmp_path / "run")
    assert meta["epoch"] == 1
    monkeypatch.setattr(ckpt_module, "save_file", real)
    assert cli.main(["train", str(recipe), "--resume"]) == 0


def test_ctrl_c_exits_130_and_resume_finishes(setup, monkeypatch, capsys):
    tmp_path, folder = setup
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config(tmp_path, folder).to_dict()))
    real = ivpt.engine.loop.evaluate
    calls = {"n": 0}

    def interrupt_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ivpt.engine.loop, "evaluate", interrupt_in_second_epoch)
    assert cli.main(["train", str(recipe)]) == cli.EXIT_INTERRUPTED
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(ivpt.engine.loop, "evaluate", real)
    assert cli.main(["train", str(recipe), "--resume"]) == 0


def test_damaged_checkpoint_is_refused(setup):
    tmp_path, folder = setup
    train(config(tmp_path, folder, epochs=2), quiet=True)
    name = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["tensors_file"]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == [name]  # the previous one is gone
    path = tmp_path / "run" / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated, altered"):
        train(config(tmp_path, folder, epochs=2), resume=True, quiet=True)


def test_interrupt_between_tensor_file_and_json_keeps_the_previous_checkpoint(setup, monkeypatch):
    tmp_path, folder = setup
    cfg = config(tmp_path, folder, epochs=2)
    train(cfg, quiet=True)
    _, before = load_checkpoint(tmp_path / "run")
    real = ckpt_module.atomic_write

    def die_before_json(path, write):
        if Path(path).name == "checkpoint.json":
            raise KeyboardInterrupt
        return real(path, write)

    monkeypatch.setattr(ckpt_module, "atomic_write", die_before_json)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1)
    with pytest.raises(KeyboardInterrupt):
        ckpt_module.save_checkpoint(tmp_path / "run", {"x": torch.zeros(2)}, optimizer, {"epoch": 99})
    monkeypatch.setattr(ckpt_module, "atomic_write", real)
    _, after = load_checkpoint(tmp_path / "run")
    assert after["epoch"] == before["epoch"] == 2


def test_ddp_sampler_never_leaves_a_process_empty():
    from ivpt.engine.distributed import Dist, GlobalBatchSampler

    for size, batch in ((9, 4), (5, 4), (1, 4)):
        shares = [list(GlobalBatchSampler(size, batch, Dist(rank, 2, rank), seed=0)) for rank in (0, 1)]
        assert all(len(b) > 0 for share in shares for b in share)
        assert len(shares[0]) == len(shares[1])  # the same number of steps on every process
        evals = [list(GlobalBatchSampler(size, 1, Dist(rank, 2, rank), seed=0, shuffle=False, whole_batches=True))
                 for rank in (0, 1)]
        assert sorted(i for share in evals for b in share for i in b) == list(range(size))


def test_config_coerces_numeric_strings_and_checks_protocol_and_device():
    assert load_config(None, ["lr=1e-3"]).lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(ConfigError, match="'lr'"):
        load_config(None, ["lr=fast"])
    with pytest.raises(ConfigError, match="protocol.lrs"):
        TrainConfig(protocol={"lrs": ["a"]}).validate()
    with pytest.raises(ConfigError, match="protocol.seeds"):
        TrainConfig(protocol={"seeds": [1.5]}).validate()
    with pytest.raises(ConfigError, match=r"protocol.seeds': \[1, 2, 1\] repeats a value"):
        TrainConfig(protocol={"seeds": [1, 2, 1]}).validate()  # would be two final runs, not three
    with pytest.raises(ConfigError, match="'device'"):
        TrainConfig(device="gpu").validate()
    with pytest.warns(UserWarning, match="warmup_epochs 5 is not below epochs 1: using 0"):
        assert TrainConfig(epochs=1, warmup_epochs=5).validate().warmup_epochs == 0  # short runs work


def test_validate_returns_a_new_config_and_leaves_the_given_one_as_it_was():
    given = TrainConfig(lr="1e-3", epochs=2, warmup_epochs=2, data={"root": "photos"})
    with pytest.warns(UserWarning, match="using 1 warm-up"):
        checked = given.validate()
    assert (checked.lr, checked.warmup_epochs, checked.data) == (0.001, 1, {"root": "photos", "kind": "folder"})
    assert (given.lr, given.warmup_epochs, given.data) == ("1e-3", 2, {"root": "photos"})


def test_the_fields_that_do_not_change_a_result_are_marked_on_the_fields():
    import dataclasses

    from ivpt.engine.config import CHANGES_RESULT, CHOICES, NOT_RESULT_FIELDS

    marked = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get(CHANGES_RESULT) is False}
    assert set(NOT_RESULT_FIELDS) == marked == {"output", "device", "workers", "eval_every", "threads", "compile",
                                                "cache", "paths_as_typed"}
    assert CHOICES["optimizer"] == ("sgd", "adamw")  # read from the field's Literal type
    with pytest.raises(ConfigError, match="'optimizer': got 'adam', expected one of 'sgd', 'adamw'"):
        TrainConfig(optimizer="adam").validate()
