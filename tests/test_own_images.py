"""A folder of photos is read as the user meant, or refused with the reason (never silently something else)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ivpt.data.datasets import DataError
from ivpt.engine.config import ConfigError, TrainConfig, load_config
from ivpt.engine.data import build_task_data, check_data_spec, stratified_holdout
from ivpt.deploy import transform_of
from ivpt.engine.loop import train
from conftest import TINY_MINI as TINY

CFG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3, "interpolation": "bicubic", "crop_pct": 0.8}


def flat_folder(root, classes=("cat", "dog", "owl"), per_class=10, size=(48, 32)):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        for i in range(per_class):
            path = root / name / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return root


def test_a_root_with_the_suite_task_is_refused_not_misread(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data: {kind: suite, task: clevr-count}\n")
    with pytest.raises(ConfigError, match="kind 'suite'.*and a 'root'.*set data.kind=folder and remove data.task"):
        load_config(base, [f"data.root={tmp_path}"])
    assert load_config(None, [f"data={{root: {tmp_path}}}"]).data == {"root": str(tmp_path), "kind": "folder"}
    assert load_config(None, ["data={task: dtd10}"]).data == {"kind": "suite", "task": "dtd10"}


def test_unknown_or_wrong_data_fields_are_refused():
    with pytest.raises(ConfigError, match="unknown field 'sead'; its fields are kind, root, val_fraction"):
        TrainConfig(data={"kind": "folder", "root": "x", "sead": 3}).validate()
    with pytest.raises(ConfigError, match="'val_fraction'.*fraction in"):
        TrainConfig(data={"kind": "folder", "root": "x", "val_fraction": 1.5}).validate()
    with pytest.raises(ConfigError, match="'preprocess'.*'crop'.*'squash'"):
        TrainConfig(data={"kind": "folder", "root": "x", "preprocess": "stretch"}).validate()
    with pytest.raises(ConfigError, match="data kind 'photos' is unknown"):
        TrainConfig(data={"kind": "photos"}).validate()


def test_random_weights_are_refused_unless_asked_for():
    with pytest.raises(ConfigError, match="'vit_base_patch16_224' gets no pretrained weights.*weights=FILE.*"
                                          "pretrained=true.*pretrained=false"):
        TrainConfig(backbone="vit_base_patch16_224", method="vpt-deep").validate()
    TrainConfig(backbone="vit_base_patch16_224", method="vpt-deep", pretrained=False).validate()  # on purpose
    TrainConfig(backbone="vit_base_patch16_224", method="full").validate()  # full fine-tuning may start from scratch
    TrainConfig(backbone="vit_base_patch16_224", method="ivpt", weights="w.safetensors").validate()
    TrainConfig(method="ivpt").validate()  # the shipped default has its own weights


def test_a_flat_folder_gets_a_seeded_stratified_holdout(tmp_path):
    root = flat_folder(tmp_path / "photos")
    data = build_task_data({"kind": "folder", "root": str(root)}, CFG)
    sizes = {s: len(d) for s, d in data.splits.items()}
    assert sizes == {"train": 18, "val": 6, "test": 6, "trainval": 24}  # 2 of each class's 10 to val and to test
    again = build_task_data({"kind": "folder", "root": str(root)}, CFG)
    assert data.splits["val"].items == again.splits["val"].items  # the same split twice
    other = build_task_data({"kind": "folder", "root": str(root), "seed": 1}, CFG)
    assert data.splits["val"].items != other.splits["val"].items
    assert sorted(label for _, label in data.splits["val"].items) == [0, 0, 1, 1, 2, 2]
    held = {i for s in ("val", "test") for i, _ in data.splits[s].items}
    assert not held & {i for i, _ in data.splits["train"].items}
    assert "20% of each class held out of train, seed 0" in data.description and "3 classes" in data.description
    # timm's evaluation pipeline: the shorter side to 32 / 0.8 = 40, centre crop 32 (not squashed)
    assert data.splits["val"][0][0].shape == (3, 32, 32)
    assert "resize the shorter side to 40 and centre-crop 32x32" in data.description
    squashed = build_task_data({"kind": "folder", "root": str(root), "preprocess": "squash"}, CFG)
    assert "squash to 32x32" in squashed.description
    keep, held = stratified_holdout([0] * 5 + [1] * 2, {"val": 0.2}, seed=0)
    assert len(held["val"]) == 2 and len(keep) == 5  # at least one per class, and train keeps one


def test_one_class_is_refused(tmp_path):
    root = flat_folder(tmp_path / "photos", classes=("cat",))
    with pytest.raises(ValueError, match="1 class folder \\(cat\\); classification needs at least two"):
        build_task_data({"kind": "folder", "root": str(root)}, CFG)


def test_short_run_on_a_flat_folder_says_what_it_trains_on(setup, tmp_path, capsys):
    work, _ = setup
    root = flat_folder(tmp_path / "photos", size=(40, 40))
    cfg = TrainConfig(backbone="vit_mini_patch4_32", backbone_options=TINY, weights=str(work / "backbone.safetensors"),
                      method="vpt-deep", method_options={"prompt_length": 2}, data={"kind": "folder", "root": str(root)},
                      epochs=1, batch_size=8, test_split="test", output=str(tmp_path / "run"))
    with pytest.warns(UserWarning, match="using 0 warm-up"):
        cfg.validate()
    results = train(cfg)
    out = capsys.readouterr().out
    assert f"data: folder {root}: 3 classes (cat, dog, owl); train 18, val 6 (20% of each class" in out
    assert results["val"]["count"] == 6 and results["test"]["count"] == 6
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["config"]
    assert saved["warmup_epochs"] == 0 and saved["data"]["kind"] == "folder"


def test_pretrained_false_on_a_shipped_backbone_means_its_architecture_at_random():
    from ivpt.engine.tasks import backbone_for

    assert backbone_for(TrainConfig(method="vpt-deep", pretrained=False)) == "vit_mini_patch4_32"
    assert backbone_for(TrainConfig(method="vpt-deep")) == "vit_mini_patch4_32.ivpt_cifar10"


def trained_on_a_folder(setup, tmp_path, **data_fields) -> tuple:
    """(photo folder, adapter folder) of a one-epoch linear probe on a flat folder of 3 classes."""
    work, _ = setup
    root = flat_folder(tmp_path / "photos", size=(40, 40))
    cfg = TrainConfig(backbone="vit_mini_patch4_32", backbone_options=TINY, weights=str(work / "backbone.safetensors"),
                      method="linear", data={"kind": "folder", "root": str(root), **data_fields}, epochs=1,
                      batch_size=8, output=str(tmp_path / "run"))
    train(cfg.validate(), quiet=True)
    return root, str(tmp_path / "run" / "adapter")


def test_eval_data_override_is_checked_like_a_recipe(setup, tmp_path, capsys):
    from ivpt import cli

    root, adapter = trained_on_a_folder(setup, tmp_path)
    assert cli.main(["eval", adapter, "--split", "val", "--data", json.dumps({"root": str(root)})]) == 0
    assert cli.main(["eval", adapter, "--split", "val", "--data", json.dumps({"root": str(root), "sead": 1})]) == 2
    assert "unknown field 'sead'" in capsys.readouterr().err
    # predict prepares images as the run evaluated them (shorter side + centre crop), not squashed
    assert cli.main(["predict", adapter, str(root / "cat"), "--output", str(tmp_path / "p.json")]) == 0


def test_ivpt_train_reproduces_the_cli_run(setup, tmp_path):
    import ivpt
    from ivpt import cli
    from safetensors.torch import load_file

    work, folder = setup
    fields = dict(backbone="vit_mini_patch4_32", backbone_options=TINY, weights=str(work / "backbone.safetensors"),
                  method="ivpt", method_options={"prompt_length": 2}, data={"kind": "folder", "root": str(folder)},
                  epochs=2, warmup_epochs=1, batch_size=8, optimizer="adamw", lr=0.05, lr_scaling=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(fields))
    assert cli.main(["train", str(recipe), "--output", str(tmp_path / "cli")]) == 0
    results = ivpt.train(recipe, output=str(tmp_path / "py"), quiet=True)
    cli_results = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert results["val"]["top1"] == cli_results["val"]["top1"] and results["log"][-1]["train_loss"] == \
        cli_results["log"][-1]["train_loss"]
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("cli", "py"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert ivpt.evaluate(tmp_path / "py" / "adapter", split="val")["top1"] == results["val"]["top1"]
    assert ivpt.train(fields, output=str(tmp_path / "dict"), quiet=True)["val"]["top1"] == results["val"]["top1"]


def test_a_holdout_fraction_beside_a_split_folder_is_refused(tmp_path):
    root = tmp_path / "photos"
    flat_folder(root / "train")
    flat_folder(root / "val", per_class=2)
    data = build_task_data({"kind": "folder", "root": str(root)}, CFG)
    assert len(data.splits["val"]) == 6 and len(data.splits["test"]) == 6  # test still held out of train
    with pytest.raises(ValueError, match="'val_fraction'.*val exists"):
        build_task_data({"kind": "folder", "root": str(root), "val_fraction": 0.3}, CFG)


def test_eval_on_new_images_keeps_the_adapters_preprocessing(setup, tmp_path, monkeypatch):
    """--data naming a folder replaces the recorded one; how images are prepared stays the adapter's."""
    import ivpt.engine.data as engine_data
    from ivpt import evaluate

    _, adapter = trained_on_a_folder(setup, tmp_path, preprocess="squash")
    seen, build = [], engine_data.build_task_data
    monkeypatch.setattr(engine_data, "build_task_data", lambda spec, pcfg: seen.append(dict(spec)) or build(spec, pcfg))
    new = flat_folder(tmp_path / "new", size=(40, 40))
    evaluate(adapter, "val", {"root": str(new)})
    evaluate(adapter, "val", {"root": str(new), "preprocess": "crop"})  # asked: as asked
    assert [s.get("preprocess") for s in seen] == ["squash", "crop"]


def test_the_data_pipeline_feeds_the_size_the_backbone_was_built_at(tmp_path):
    """timm keeps the pretrained input_size when img_size is a model option: the transforms must not
    (a run at img_size 48 on the 32-px backbone's architecture fed 32-px images and failed in timm)."""
    import timm
    import torch
    from safetensors.torch import save_file

    import ivpt.backbones  # noqa: F401  (registers vit_mini_patch4_32)
    from ivpt.backbone import input_config

    vit = timm.create_model("vit_mini_patch4_32", img_size=48, **TINY)
    assert vit.pretrained_cfg["input_size"][-1] == 32 and input_config(vit)["input_size"] == (3, 48, 48)
    torch.manual_seed(0)
    save_file(vit.state_dict(), str(tmp_path / "b48.safetensors"))
    cfg = TrainConfig(backbone="vit_mini_patch4_32", backbone_options={**TINY, "img_size": 48},
                      weights=str(tmp_path / "b48.safetensors"), method="linear", epochs=1, batch_size=8,
                      data={"kind": "folder", "root": str(flat_folder(tmp_path / "p", size=(60, 50)))},
                      output=str(tmp_path / "run"))
    result = train(cfg.validate(), quiet=True)
    assert result["val"]["count"] == 6
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["image_size"] == [48, 48]


def test_eval_refuses_a_folder_changed_since_training(setup, tmp_path, capsys):
    """One image added after training redraws the held-out splits: ivpt eval on the adapter's own folder
    would score images it trained on, so it says so; new images given with --data are scored."""
    from ivpt import cli

    root, adapter = trained_on_a_folder(setup, tmp_path)
    assert cli.main(["eval", adapter]) == 0  # unchanged: the same splits
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(root / "cat" / "new.jpg")
    assert cli.main(["eval", adapter]) == 2
    said = capsys.readouterr().err
    assert "the folder changed since the adapter was trained: its train split now holds" in said
    # --data naming the same folder draws the same held-out splits from it: refused alike, not scored
    assert cli.main(["eval", adapter, "--data", json.dumps({"root": str(root)})]) == 2
    assert "the folder changed since the adapter was trained" in capsys.readouterr().err
    (root / "cat" / "new.jpg").unlink()
    assert cli.main(["eval", adapter, "--data", json.dumps({"root": str(root)})]) == 0  # unchanged: its own splits


def test_a_split_folder_under_another_name_is_refused_not_ignored(tmp_path):
    root = tmp_path / "photos"
    flat_folder(root / "train")
    flat_folder(root / "validation", per_class=2)
    with pytest.raises(DataError, match=r"validation: split folders are named exactly train/, val/ and test/ "
                                        r"\(train/ required\); rename it to val/"):
        build_task_data({"kind": "folder", "root": str(root)}, CFG)
    flat = flat_folder(tmp_path / "flat", classes=("invalid", "valid"))  # class folders may have such names
    assert build_task_data({"kind": "folder", "root": str(flat)}, CFG).classes == ["invalid", "valid"]


def test_new_images_are_read_as_the_adapters_run_read_its_own(setup, tmp_path):
    """An adapter records its folder's image reading (EXIF orientation); predict and eval read new images
    the same way, and an adapter saved before ivpt applied the tag keeps reading the stored pixels."""
    import torch

    import ivpt
    from ivpt import cli
    from ivpt.data.datasets import open_rgb
    from conftest import oriented_jpeg, rewrite_config

    _, adapter = trained_on_a_folder(setup, tmp_path)
    assert ivpt.adapter.read_adapter_config(adapter)["data"]["exif_orientation"] is True  # spelt out
    photo = tmp_path / "new" / "portrait.jpg"
    oriented_jpeg(photo)  # 16 x 8 stored, 8 x 16 shown

    def predicted(upright_expected):
        assert cli.main(["predict", adapter, str(photo), "--top-k", "3", "--output", str(tmp_path / "p.json")]) == 0
        scores = json.loads((tmp_path / "p.json").read_text())["predictions"][0]["top_k"]
        model, config = cli._load_for_inference(adapter, None)
        x = transform_of(cli._preprocess(config, model))(open_rgb(photo, upright_expected))
        with torch.no_grad():
            expected = model.eval()(x[None]).softmax(-1)[0]
        names = model.class_names
        return all(abs(expected[names.index(s["label"])].item() - s["score"]) < 1e-4 for s in scores)

    assert predicted(True) and not predicted(False)
    rewrite_config(Path(adapter), lambda c: c["data"].pop("exif_orientation"))  # as saved by an older ivpt
    assert predicted(False) and not predicted(True)
    assert cli.main(["eval", adapter, "--split", "val", "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["data"]["exif_orientation"] is False  # read as it was
    with pytest.raises(DataError, match="data field 'exif_orientation': got 'yes', expected true or false"):
        check_data_spec({"kind": "folder", "root": str(tmp_path / "photos"), "exif_orientation": "yes"})
    stored = build_task_data({"kind": "folder", "root": str(tmp_path / "photos"), "exif_orientation": False}, CFG)
    assert not any(split.upright for name, split in stored.splits.items() if name != "trainval")


def test_split_folders_spelt_otherwise_are_refused_not_read_as_classes(tmp_path):
    """Train/ + Test/ (a Kaggle layout) or training/ + testing/ without train/ would be read as two classes,
    each holding every class's images: the model would learn which split an image came from."""
    for layout, named in (({"Train", "Test"}, r"rename Test/ to test/, Train/ to train/; as they are, each would "
                                              r"be read as a class"),
                          ({"training", "testing"}, r"rename testing/ to test/, training/ to train/"),
                          ({"test", "val"}, r"put the training images under train/<class>/")):
        root = tmp_path / "_".join(sorted(layout))
        for split in layout:
            flat_folder(root / split, per_class=2)
        with pytest.raises(DataError, match=named):
            build_task_data({"kind": "folder", "root": str(root)}, CFG)
    both = tmp_path / "both"
    for split in ("train", "val", "validation"):
        flat_folder(both / split, per_class=2)
    with pytest.raises(DataError, match="both val/ and validation/ exist"):
        build_task_data({"kind": "folder", "root": str(both)}, CFG)
    # classes that merely share a word with a split stay classes
    assert build_task_data({"kind": "folder", "root": str(flat_folder(tmp_path / "docs", classes=("valid", "void")))},
                           CFG).classes == ["valid", "void"]


def test_images_repeated_across_splits_or_classes_are_reported(tmp_path):
    """A copy of a training photo in test/ is scored as unseen; the same photo under two classes carries
    two labels. Both are said (warning and the run's data line), naming a pair of files."""
    import shutil

    root = tmp_path / "photos"
    flat_folder(root / "train", per_class=6)
    flat_folder(root / "test", per_class=2, size=(40, 40))
    clean = build_task_data({"kind": "folder", "root": str(root)}, CFG)
    assert "WARNING" not in clean.description
    shutil.copy(root / "train" / "cat" / "0.jpg", root / "test" / "cat" / "copy.jpg")
    shutil.copy(root / "train" / "cat" / "1.jpg", root / "train" / "dog" / "again.jpg")
    with pytest.warns(UserWarning, match=r"1 image\(s\) in two splits \(e\.g\. .*train/cat/0\.jpg and "
                                         r".*test/cat/copy\.jpg hold the same bytes\): val/test scores count them"):
        data = build_task_data({"kind": "folder", "root": str(root)}, CFG)
    assert "WARNING: 1 image(s) in two splits" in data.description
    assert "1 image(s) under two classes" in data.description and "again.jpg" in data.description


def test_symlinked_subfolders_are_read_and_metadata_folders_are_not(tmp_path):
    """A class folder's symlinked subfolder is part of the class (rglob skipped it before Python 3.13);
    a link looping back is walked once; a NAS's @eaDir thumbnails and a zip's __MACOSX are not data."""
    from ivpt.data.datasets import visible_files

    root = flat_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=3)
    more = flat_folder(tmp_path / "elsewhere", classes=("cat",), per_class=4)
    (root / "cat" / "more").symlink_to(more / "cat", target_is_directory=True)
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)
    thumbs = root / "dog" / "@eaDir" / "0.jpg"
    thumbs.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(thumbs / "SYNOPHOTO_THUMB_S.jpg")
    (root / "__MACOSX" / "cat").mkdir(parents=True)
    (root / "__MACOSX" / "cat" / "._0.jpg").write_bytes(b"\0\5\26\7")
    data = build_task_data({"kind": "folder", "root": str(root), "val_fraction": 0, "test_fraction": 0}, CFG)
    assert data.classes == ["cat", "dog"]
    files = sorted(rel for rel, _ in data.splits["train"].items)
    assert files == sorted([f"cat/{i}.jpg" for i in range(3)] + [f"cat/more/{i}.jpg" for i in range(4)]
                           + [f"dog/{i}.jpg" for i in range(3)])
    assert len(visible_files(root / "cat")) == 7


def test_class_names_that_differ_only_in_case_or_unicode_form_are_said(tmp_path):
    import unicodedata

    root = flat_folder(tmp_path / "photos", classes=("Cat", "cat", "dog"), per_class=2)
    with pytest.warns(UserWarning, match=r"class folders 'Cat' and 'cat' differ only in case"):
        build_task_data({"kind": "folder", "root": str(root), "val_fraction": 0, "test_fraction": 0}, CFG)
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    split = tmp_path / "split"
    flat_folder(split / "train", classes=(nfc, "tea"), per_class=3)
    flat_folder(split / "test", classes=(nfd, "tea"), per_class=1)
    with pytest.raises(DataError, match=r"differ from the expected classes \(train's\): 'cafe\\u0301', 'caf\\xe9' are "
                                        r"the same name spelt with other characters"):
        build_task_data({"kind": "folder", "root": str(split)}, CFG)


def test_eval_data_on_the_adapters_own_folder_draws_its_held_out_splits_as_training_did(setup, tmp_path, capsys):
    """--data naming the training folder without a seed used seed 0, a run trained with seed 1 drew other
    held-out images, and its test split held images the adapter trained on: now the recorded seed is
    used, and another seed asked for is refused."""
    from ivpt import cli, evaluate

    root, adapter = trained_on_a_folder(setup, tmp_path, seed=1)
    own = evaluate(adapter, "test")
    same = evaluate(adapter, "test", {"root": str(root)})
    assert same["data"]["seed"] == 1 and same["count"] == own["count"] and same["top1"] == own["top1"]
    assert cli.main(["eval", adapter, "--data", json.dumps({"root": str(root), "seed": 0})]) == 2
    assert "draws this folder's held-out splits otherwise than training did (seed 0 (trained with 1))" in \
        capsys.readouterr().err


def test_the_resize_is_timms_and_an_adapter_records_it(setup, tmp_path):
    """timm resizes to floor(size / crop_pct); the adapter records the size, so new images are read at it
    whatever crop_pct a later timm gives; an adapter saved before keeps its run's rounding."""
    import ivpt
    from ivpt import cli
    from ivpt.data.transforms import timm_resize
    from conftest import rewrite_config

    assert timm_resize({"input_size": (3, 224, 224), "crop_pct": 0.9}) == 248  # round() gave 249
    root = flat_folder(tmp_path / "photos", size=(40, 40))
    custom = build_task_data({"kind": "folder", "root": str(root), "resize": 36}, CFG)
    assert "resize the shorter side to 36 and centre-crop 32x32 (data field 'resize')" in custom.description
    with pytest.raises(DataError, match="data field 'resize': 20 is below the input size 32"):
        build_task_data({"kind": "folder", "root": str(root), "resize": 20}, CFG)
    with pytest.raises(DataError, match="data field 'resize': got 3.5"):
        check_data_spec({"kind": "folder", "root": str(root), "resize": 3.5})
    _, adapter = trained_on_a_folder(setup, tmp_path)
    assert ivpt.adapter.read_adapter_config(adapter)["data"]["resize"] == 32  # crop_pct 1 at 32 px

    def resize_of(config):
        model, _ = cli._load_for_inference(adapter, None)
        return next(s.size for s in transform_of(cli._preprocess(config, model)).transforms if hasattr(s, "size"))

    config = ivpt.adapter.read_adapter_config(adapter)
    assert resize_of({**config, "data": {**config["data"], "resize": 35}}) == 35  # the recorded size, as recorded
    rewrite_config(Path(adapter), lambda c: c["data"].pop("resize"))  # as saved by an older ivpt
    assert resize_of(ivpt.adapter.read_adapter_config(adapter)) == 32
