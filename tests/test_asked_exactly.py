"""Every input is done exactly as asked or refused with a way forward (issue 36): the five silent cases,
the dead ends, and a table of the bad-input classes over every subcommand that takes them."""
import json
import os
import shutil
import time

import pytest
import torch

import ivpt
import ivpt.hub
from conftest import photo_folder
from ivpt.cli import main
from ivpt.engine.config import ConfigError, TrainConfig, load_config


def run(argv, capsys) -> tuple[int, str, str]:
    """``ivpt ARGV`` in this process: (exit code, stdout, stderr); argparse's own refusals included."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def train_argv(weights_set, output, *more) -> list[str]:
    return ["train", "--set", *weights_set, "method=linear", "epochs=1", "warmup_epochs=0", "batch_size=8",
            *more, "--output", str(output)]


# -- the five silent cases ----------------------------------------------------------------------
def test_every_repeated_set_applies(tiny_weights, tmp_path, capsys):
    """`--set data.root=photos --set epochs=1 method=linear` trained on the built-in task: only the last
    --set was kept. Every --set applies now; a key given twice with two values is refused."""
    _, weights_set = tiny_weights
    photos = photo_folder(tmp_path / "photos")
    code, out, err = run(["train", "--set", f"data.root={photos}", "--set", *weights_set, "--set", "epochs=1",
                          "method=linear", "warmup_epochs=0", "batch_size=8", "--output", str(tmp_path / "run")], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["data"]["root"] == str(photos.resolve()) and results["classes"] == ["cat", "dog", "owl"]
    assert results["config"]["method"] == "linear" and results["config"]["epochs"] == 1
    code, _, err = run(["train", "--set", "epochs=1", "--set", "epochs=2", "--output", str(tmp_path / "r2")], capsys)
    assert code == 2 and "override 'epochs' is given twice (epochs=1 and epochs=2); give it once" in err
    assert not (tmp_path / "r2").exists()


def test_paths_are_recorded_absolute_and_a_moved_folder_is_known_by_its_content(tiny_weights, tmp_path, capsys,
                                                                                 monkeypatch):
    """An adapter recorded data.root as typed ('photos'): eval from elsewhere failed, and the absolute path with
    another test_fraction got past the guard against re-drawn splits (test held training images)."""
    _, weights_set = tiny_weights
    work = tmp_path / "work"
    photo_folder(work / "photos", per_class=20)
    monkeypatch.chdir(work)
    assert run(train_argv(weights_set, "run", "data={root: photos, seed: 3}"), capsys)[0] == 0
    adapter = work / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["data"]["root"] == str((work / "photos").resolve())  # absolute
    assert config["training_config"]["paths_as_typed"]["data.root"] == "photos"
    assert config["training_config"]["output"] == str((work / "run").resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere
    own = ivpt.evaluate(adapter, "test")
    assert own["count"] == 12  # 20% of each class of 20
    # the folder moved: known as the adapter's own by its content, its held-out splits drawn as training drew
    # them (seed 3, where a spec without a seed draws seed 0)
    shutil.move(str(work / "photos"), str(tmp_path / "moved"))
    moved = ivpt.evaluate(adapter, "test", {"root": str(tmp_path / "moved")})
    assert moved["data"]["seed"] == 3 and moved["count"] == own["count"] and moved["top1"] == own["top1"]
    # another folder of the same classes (other files) is images of their own: drawn as its spec says
    photo_folder(tmp_path / "other", per_class=15)
    assert "seed" not in ivpt.evaluate(adapter, "test", {"root": str(tmp_path / "other")})["data"]
    code, _, err = run(["eval", str(adapter), "--data", json.dumps({"root": "moved", "test_fraction": 0.3})], capsys)
    assert code == 2 and "draws this folder's held-out splits otherwise than training did (test_fraction 0.3" in err
    # the card shows the path as typed; a push says that the config records this machine's paths
    card = (adapter / "README.md").read_text()
    assert '"root": "photos"' in card and str((work / "photos").resolve()) not in card
    with pytest.warns(UserWarning, match="record local paths \\(.*data.root"):
        ivpt.hub.push_to_hub(adapter, "someone/x", dry_run=tmp_path / "upload")


def test_held_out_fractions_are_each_of_the_class_and_impossible_ones_refused(tmp_path):
    """40 images a class at 0.2 / 0.2 gave 8 val but 6 test (test was taken from what val left)."""
    from ivpt.engine.data import build_task_data

    cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3, "interpolation": "bicubic",
           "crop_pct": 1.0}
    root = photo_folder(tmp_path / "photos", classes=("a", "b"), per_class=40, size=(32, 32))
    data = build_task_data({"kind": "folder", "root": str(root)}, cfg)
    assert len(data.splits["val"]) == 16 and len(data.splits["test"]) == 16 and len(data.splits["train"]) == 48
    assert "val 16 (20% of each class held out of train, seed 0), test 16 (20% of each class held" in \
        data.description
    old = build_task_data({"kind": "folder", "root": str(root), "holdout_rule": 1}, cfg)  # adapters before the fix
    assert len(old.splits["test"]) == 12 and "20% of each class of what val left" in old.description
    with pytest.raises(ConfigError, match="'val_fraction' and 'test_fraction': 0.6 \\+ 0.6 of each class leave"):
        TrainConfig(data={"root": str(root), "val_fraction": 0.6, "test_fraction": 0.6}).validate()


def test_an_adapter_from_before_the_holdout_fix_keeps_its_own_held_out_splits(tiny_weights, tmp_path):
    """Its record names no holdout rule: its splits are drawn by the rule it was trained with (rule 1), so the
    folder reads as unchanged and its test split as the one it was trained beside."""
    from ivpt.adapter_format import read_adapter_config, read_adapter_tensors, write_adapter

    _, weights_set = tiny_weights
    root = photo_folder(tmp_path / "photos", per_class=20)
    cfg = load_config(None, [*weights_set, "method=linear", "epochs=1", "warmup_epochs=0", "batch_size=8",
                             f"data={{root: {root}, holdout_rule: 1}}", f"output={tmp_path / 'run'}"])
    ivpt.train(cfg, quiet=True)
    adapter = tmp_path / "run" / "adapter"
    config = read_adapter_config(adapter)
    tensors = read_adapter_tensors(adapter, config)
    config["data"].pop("holdout_rule")  # as an adapter written before the field existed records it
    shutil.rmtree(adapter)
    write_adapter(adapter, tensors, config)
    assert ivpt.evaluate(adapter, "test")["count"] == 9  # 20% of the 16 that val left, per class of 20


def test_zero_prompts_is_refused_not_a_linear_probe_under_another_name():
    for method in ("vpt-deep", "vpt-shallow", "gatevpt", "ivpt"):
        with pytest.raises(ConfigError, match="'prompt_length': got 0"):
            TrainConfig(method=method, method_options={"prompt_length": 0}).validate()


def test_a_recipe_key_given_twice_is_refused_with_both_lines(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 1\nlr: 0.1\nepochs: 50\n")
    with pytest.raises(ConfigError, match="r.yaml: key 'epochs' is given twice \\(lines 1 and 3\\); keep one"):
        load_config(recipe)
    recipe.write_text("data:\n  kind: suite\n  task: dtd10\n  task: clevr-count\n")
    with pytest.raises(ConfigError, match="key 'task' is given twice \\(lines 3 and 4\\)"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="override data: key 'task' is given twice"):
        load_config(None, ["data={task: dtd10, task: clevr-count}"])


# -- dead ends ----------------------------------------------------------------------------------
def test_a_damaged_checkpoint_has_a_way_out(tiny_weights, tmp_path, capsys):
    _, weights_set = tiny_weights
    photos = photo_folder(tmp_path / "photos")
    argv = train_argv(weights_set, tmp_path / "run", f"data.root={photos}")
    assert run(argv, capsys)[0] == 0
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    (tmp_path / "run" / meta["tensors_file"]).write_bytes(b"damaged")
    code, _, err = run(argv + ["--resume"], capsys)
    assert code == 2 and "does not match" in err and "with --restart instead of --resume" in err
    code, _, err = run(argv, capsys)
    assert code == 1 and "--restart to start it over" in err
    code, _, err = run(argv + ["--restart"], capsys)
    assert code == 0, err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / meta["tensors_file"]).read_bytes() == b"damaged"  # nothing deleted
    assert f"now in {aside[0]}" in err and (tmp_path / "run" / "results.json").is_file()


def test_an_adapter_trained_on_random_weights_is_evaluated_from_the_cli(tmp_path, capsys):
    """`pretrained: false` is documented; the backbone is rebuilt from the run's seed, as the run built it."""
    photos = photo_folder(tmp_path / "photos", size=(32, 32))
    argv = ["train", "--set", "backbone=vit_tiny_patch16_224", "backbone_options={img_size: 32, depth: 2}",
            "pretrained=false", "method=vpt-deep", "method_options={prompt_length: 2}", "epochs=1",
            "warmup_epochs=0", "batch_size=8", "seed=7", f"data.root={photos}", "--output", str(tmp_path / "run")]
    assert run(argv, capsys)[0] == 0
    val = json.loads((tmp_path / "run" / "results.json").read_text())["val"]["top1"]
    code, out, err = run(["eval", str(tmp_path / "run" / "adapter"), "--split", "val"], capsys)
    assert code == 0, err
    assert json.loads(out)["top1"] == round(val, 4)


def test_data_given_as_text_names_the_mapping_it_needs(capsys):
    with pytest.raises(ConfigError, match="got the text 'photos', expected a mapping.*'kind': 'folder', 'root': "
                                          "'photos'.*data.root=photos"):
        ivpt.train(data="photos")
    code, _, err = run(["train", "--set", "data={root: x"], capsys)
    assert code == 2 and "override data: '{root: x' is not a valid YAML value" in err and "kind" not in err


def test_another_backbone_is_named_before_anything_is_downloaded(tmp_path, monkeypatch):
    from ivpt.adapter_format import AdapterError

    ivpt.create_model("vit_mini_patch4_32.ivpt_cifar10", "linear", 3).save_adapter(tmp_path / "a")
    monkeypatch.setattr("ivpt.factory.build_backbone", lambda *a, **k: pytest.fail("built a backbone"))
    with pytest.raises(AdapterError, match="name: adapter 'vit_mini_patch4_32.ivpt_cifar10', backbone "
                                           "'vit_small_patch16_224'"):
        ivpt.load_adapter(tmp_path / "a", backbone="vit_small_patch16_224")


def test_an_unreachable_server_is_said_in_seconds_and_the_cache_still_serves(tmp_path, monkeypatch):
    """huggingface_hub retries a dead network for about a minute; ivpt asks the server once."""
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    from ivpt.backbone import BackboneError, build_backbone
    from ivpt.reach import unreachable

    start = time.monotonic()
    assert "cannot be looked up" in unreachable("https://ivpt-test.invalid/x")  # RFC 2606: never resolves
    assert time.monotonic() - start < 10
    monkeypatch.setattr("ivpt.reach.hub_unreachable", lambda: "huggingface.co cannot be looked up (test)")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    with pytest.raises(BackboneError, match="cannot reach \\(huggingface.co cannot be looked up \\(test\\)\\), and "
                                            "they are not in the local cache"):
        build_backbone(name, 10, pretrained=True, img_size=32)
    # huggingface_hub's cache layout: a snapshot named by its commit, refs/main naming it
    repo = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    torch.manual_seed(3)
    weights = timm.create_model("vit_tiny_patch16_224", img_size=32).state_dict()
    save_file(weights, str(repo / "snapshots" / ("a" * 40) / "model.safetensors"))
    vit = build_backbone(name, 10, pretrained=True, img_size=32)
    assert torch.equal(vit.patch_embed.proj.weight, weights["patch_embed.proj.weight"])


def test_class_mismatches_are_named(tiny_weights, tmp_path, capsys):
    from ivpt.data import image_folder

    root = photo_folder(tmp_path / "photos")
    shutil.rmtree(root / "owl")
    photo_folder(tmp_path / "photos", classes=("cracked",), per_class=2)
    with pytest.raises(ValueError, match="missing 'owl'; not in the expected classes 'cracked'"):
        image_folder(root, classes=["cat", "dog", "owl"])
    _, weights_set = tiny_weights
    other = photo_folder(tmp_path / "trained")
    assert run(train_argv(weights_set, tmp_path / "run", f"data.root={other}"), capsys)[0] == 0
    code, _, err = run(["eval", str(tmp_path / "run" / "adapter"), "--data", json.dumps({"root": str(root)})], capsys)
    assert code == 2 and "missing 'owl'; not in the adapter 'cracked'" in err


def test_a_home_relative_root_is_expanded(tiny_weights, tmp_path, monkeypatch, capsys):
    _, weights_set = tiny_weights
    monkeypatch.setenv("HOME", str(tmp_path))
    photo_folder(tmp_path / "photos")
    assert run(train_argv(weights_set, "~/run", "data.root=~/photos"), capsys)[0] == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["data"]["root"] == str((tmp_path / "photos").resolve())


def test_a_folder_or_an_image_as_a_recipe_says_what_to_do(tmp_path, capsys):
    from PIL import Image

    photos = photo_folder(tmp_path / "photos")
    code, _, err = run(["train", str(photos)], capsys)
    assert code == 2 and "is a folder, not a recipe" in err and f"ivpt train --set data.root={photos}" in err
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    code, _, err = run(["train", str(tmp_path / "x.jpg")], capsys)
    assert code == 2 and "is not a recipe: it is not UTF-8 text" in err and "codec" not in err
    code, _, err = run(["train", str(tmp_path / "missing.yaml")], capsys)
    assert code == 1 and "recipe not found" in err  # a missing file: 1, as the exit-code table says


def test_tune_names_a_missing_data_folder_before_any_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ivpt.factory.build_backbone", lambda *a, **k: pytest.fail("built a backbone"))
    code, _, err = run(["tune", "configs/vtab/dtd.yaml", "--set", f"data.root={tmp_path / 'missing'}",
                        "--output", str(tmp_path / "t")], capsys)
    assert code == 1 and f"config field 'data.root': {tmp_path / 'missing'} does not exist" in err


def test_a_failing_trial_is_said_once_by_ivpt(tiny_weights, tmp_path, capsys):
    _, weights_set = tiny_weights
    lonely = photo_folder(tmp_path / "photos", classes=("cat",))
    code, _, err = run(["tune", "configs/suite/base.yaml", "--set", *weights_set, "method=linear", "method_options={}",
                        "epochs=1",
                        f"data={{root: {lonely}}}", "protocol={lrs: [0.1], wds: [0.0], seeds: [0]}", "--pruner", "none",
                        "--output", str(tmp_path / "t")], capsys)
    assert code == 2 and "classification needs at least two" in err
    assert "Trial 0 failed" not in err and "Traceback" not in err


def test_warnings_are_one_clean_line(tiny_weights, tmp_path):
    """Run as a user runs it (pytest records warnings in-process instead of printing them)."""
    import subprocess
    import sys

    _, weights_set = tiny_weights
    photos = photo_folder(tmp_path / "photos")
    argv = ["train", "--set", *weights_set, "method=linear", "epochs=1", "batch_size=8", f"data.root={photos}",
            "--output", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-c", "import sys; from ivpt.cli import main; sys.exit(main())", *argv],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = done.stderr
    assert done.returncode == 0, err
    line = next(line for line in err.splitlines() if "warm-up" in line)
    assert line == "ivpt: warning: warmup_epochs 10 is not below epochs 1: using 0 warm-up epoch(s)"
    assert "UserWarning" not in err and ".py:" not in err


def test_params_shows_the_shipped_default_backbone(capsys):
    code, out, _ = run(["params", "--method", "linear"], capsys)
    assert code == 0 and out.startswith("vit_mini_patch4_32.ivpt_cifar10, 100 classes")


# -- the bad-input battery, by class, over every subcommand that takes them ---------------------
REPEATED = [  # (argv, option): an option given twice with two values
    (["train", "--output", "a", "--output", "b"], "--output"),
    (["eval", "x", "--split", "val", "--split", "test"], "--split"),
    (["eval", "x", "--batch-size", "2", "--batch-size", "3"], "--batch-size"),
    (["predict", "x", "img", "--top-k", "1", "--top-k", "2"], "--top-k"),
    (["explain", "x", "img", "--output", "a", "--output", "b"], "--output"),
    (["export", "x", "--merged", "a.safetensors", "--merged", "b.safetensors"], "--merged"),
    (["params", "--method", "lora", "--method", "ssf"], "--method"),
    (["tune", "r.yaml", "--pruner", "sha", "--pruner", "none"], "--pruner"),
    (["tune", "r.yaml", "--storage", "sqlite:///a.db", "--storage", "sqlite:///b.db"], "--storage"),
    (["push", "x", "org/name", "--dry-run", "a", "--dry-run", "b"], "--dry-run"),
    (["quickstart", "--epochs", "1", "--epochs", "2"], "--epochs"),
    (["pretrain", "--out", "a", "--out", "b"], "--out"),
]


@pytest.mark.parametrize("argv,option", REPEATED, ids=[" ".join(a[:1] + [o]) for a, o in REPEATED])
def test_an_option_given_twice_with_two_values_is_refused(argv, option, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and f"{option} is given twice" in err


ZERO = [  # (argv, what the message names): options whose 0 would mean something else, or nothing
    (["train", "--set", "method=vpt-deep", "method_options.prompt_length=0"], "'prompt_length': got 0"),
    (["train", "--set", "method=vpt-shallow", "method_options.prompt_length=0"], "'prompt_length': got 0"),
    (["train", "--set", "method=lora", "method_options.lora_rank=0"], "'lora_rank': got 0"),
    (["train", "--set", "method=adapter", "method_options.bottleneck=0"], "'bottleneck': got 0"),
    (["train", "--set", "epochs=0"], "'epochs': got 0"),
    (["train", "--set", "batch_size=0"], "'batch_size': got 0"),
    (["train", "--set", "data={kind: cifar10, limit: 0}"], "'limit': got 0"),
    (["train", "--set", "segmentation={crop_size: 0}"], "'segmentation.crop_size': got 0"),
    (["train", "--set", "method_options={layers: [1, 1]}"], "'layers': [1, 1] repeats"),
    (["tune", "configs/suite/base.yaml", "--workers", "0"], "--workers: '0': expected"),
    (["tune", "configs/suite/base.yaml", "--heartbeat", "0"], "--heartbeat: '0': expected"),
    (["params", "--num-classes", "0"], "--num-classes: '0': expected"),
    (["params", "--prompt-length", "0"], "--prompt-length: '0': expected"),
    (["eval", "x", "--batch-size", "0"], "--batch-size: '0': expected"),
    (["predict", "x", "img", "--top-k", "0"], "--top-k: '0': expected"),
    (["quickstart", "--epochs", "0"], "--epochs: '0': expected"),
]


@pytest.mark.parametrize("argv,named", ZERO, ids=[" ".join(a[:3]) for a, _ in ZERO])
def test_a_zero_that_would_mean_something_else_is_refused(argv, named, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and named in err


def test_path_fields_name_what_is_missing(tmp_path, capsys):
    """A missing file or folder exits 1 (the exit-code table's file problem), naming the field."""
    missing = tmp_path / "missing"
    for argv, named in ((["train", "--set", f"data.root={missing}"], "config field 'data.root'"),
                        (["train", "--set", f"weights={missing}.safetensors"], "config field 'weights'"),
                        (["tune", "configs/suite/base.yaml", "--set", f"weights={missing}.pt"], "config field 'weights'"),
                        (["eval", str(missing)], str(missing)),
                        (["predict", str(missing), str(tmp_path)], str(missing))):
        code, _, err = run(argv, capsys)
        assert code == 1 and named in err, (argv, err)
        assert not missing.exists()
    code, _, err = run(["export", str(missing), "--merged", str(tmp_path / "none" / "m.safetensors")], capsys)
    assert code == 2 and f"folder {tmp_path / 'none'} does not exist" in err  # checked before the adapter is read
    for text in ("2024", "null", "{a: b}"):  # read as YAML, these are no paths
        code, _, err = run(["train", "--set", f"output={text}"], capsys)
        assert code == 2 and "config field 'output'" in err and "expected a path" in err, (text, err)
    code, _, err = run(["train", "--set", "data.root=2024"], capsys)
    assert code == 2 and "data field 'root': got 2024, expected a path" in err


def test_duplicate_keys_are_refused_in_every_text_a_user_writes(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\nmethod: ssf\n")
    for argv in (["train", str(recipe)], ["tune", str(recipe)]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "key 'method' is given twice (lines 1 and 2)" in err
    code, _, err = run(["eval", "x", "--data", '{"root": "a", "root": "b"}'], capsys)
    assert code == 2 and "key 'root' is given twice" in err
    code, _, err = run(["params", "--method", "lora", "--options", '{"lora_rank": 2, "lora_rank": 4}'], capsys)
    assert code == 2 and "key 'lora_rank' is given twice" in err


def test_list_options_refuse_a_repeated_entry(capsys):
    code, _, err = run(["tune", "configs/suite/base.yaml", "--tasks", "clevr-count,clevr-count"], capsys)
    assert code == 2 and "--tasks clevr-count,clevr-count: a task is listed twice" in err
    code, _, err = run(["eval", "x", "--multiscale", "1.0", "1.0"], capsys)
    assert code == 2 and "--multiscale 1.0 1.0: a scale is listed twice" in err


def test_path_arguments_expand_a_home_that_the_shell_left(tmp_path, monkeypatch, capsys):
    """`--output=~/x` and quoted paths reach ivpt with the ~ in them."""
    monkeypatch.setenv("HOME", str(tmp_path))
    ivpt.create_model("vit_mini_patch4_32.ivpt_cifar10", "lora", 3).save_adapter(tmp_path / "a")
    code, out, err = run(["export", "~/a", "--merged=~/m.safetensors"], capsys)
    assert code == 0, err
    assert (tmp_path / "m.safetensors").is_file() and not (tmp_path / "~").exists()
    code, _, err = run(["params", "--method", "lora", "--output=~/p.json"], capsys)
    assert code == 0 and (tmp_path / "p.json").is_file()
    assert ivpt.load_adapter("~/a").head.out_features == 3


def test_a_run_from_before_the_holdout_fix_resumes_when_asked_for_its_rule(tmp_path):
    from ivpt.engine.config import as_started
    from ivpt.engine.loop import config_differences, resume_hint

    cfg = as_started(TrainConfig(data={"root": str(tmp_path)}).validate())
    saved = {**cfg.to_dict(), "data": {"root": str(tmp_path), "kind": "folder"}}  # a checkpoint before the field
    diff = config_differences(saved, cfg)
    assert diff == ["data"] and "--set data.holdout_rule=1" in resume_hint(saved, diff)
    old_rule = as_started(TrainConfig(data={"root": str(tmp_path), "holdout_rule": 1}).validate())
    assert config_differences(saved, old_rule) == []


def test_a_study_is_the_same_from_any_working_directory(tmp_path, monkeypatch):
    """Workers in other directories (or machines mounting the data elsewhere) join one study: its key is made of
    the paths as typed, and a study from before the holdout field keeps its key under rule 1."""
    import hashlib

    from ivpt.engine.config import as_started
    from ivpt.engine.study import study_key

    keys = []
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        monkeypatch.chdir(tmp_path / where)
        keys.append(study_key(as_started(load_config(None, ["data.root=photos", "data.holdout_rule=1"]))))
    assert keys[0] == keys[1]
    before = load_config(None, ["data.root=photos"]).to_dict()  # the key of a study started before the change
    fields = {k: v for k, v in before.items() if k not in ("lr", "weight_decay", "seed", "output", "device", "workers",
                                                            "threads", "compile", "cache", "train_split", "eval_split",
                                                            "test_split", "eval_every", "paths_as_typed")}
    assert keys[0] == hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_restart_moves_only_a_run(tmp_path, capsys):
    from ivpt.engine.checkpoint import set_aside_run

    photos = photo_folder(tmp_path / "photos")
    assert set_aside_run(photos) is None and (photos / "cat").is_dir()  # not a run: left where it is
    assert set_aside_run(tmp_path / "nothing") is None


def test_pretrain_refuses_zero_and_expands_home(tmp_path, monkeypatch):
    from ivpt.backbones.pretrain import parse_args

    for flag in ("--threads", "--epochs", "--depth"):
        with pytest.raises(SystemExit):
            parse_args(["--out", "x", flag, "0"])
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_args(["--out", "~/run"]).out == str(tmp_path / "run")
