"""Data layouts, each read from a small fixture that the test writes in that exact layout."""
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ivpt.data import procedural, sources
from ivpt.data.cifar10 import load_cifar10
from ivpt.data.datasets import DataError
from ivpt.data.fgvc import FGVC_DATASETS, fgvc
from ivpt.data.folder import image_folder, image_folder_splits
from ivpt.data.suite import SUITE_TASKS, load_task, summarize
from ivpt.data.transforms import backbone_transform, fgvc_transform, vtab_transform
from ivpt.data.vtab import VTAB_TASKS, vtab_1k
from conftest import image_bytes, oriented_jpeg, write_tar


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IVPT_CACHE", str(tmp_path / "cache"))


def write_image(path: Path, value: int = 0, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def snapshot(root: Path):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# -- folder per class --------------------------------------------------------------------------
def test_image_folder_reads_classes_in_order_and_leaves_the_folder_alone(tmp_path):
    for cls, n in (("cat", 2), ("ant", 3)):
        for i in range(n):
            write_image(tmp_path / "data" / cls / f"{i}.png", value=10 * i)
    before = snapshot(tmp_path / "data")
    ds = image_folder(tmp_path / "data")
    assert ds.classes == ["ant", "cat"] and len(ds) == 5
    image, label = ds[4]
    assert label == 1 and image.size == (12, 10) and image.mode == "RGB"
    assert snapshot(tmp_path / "data") == before


def test_image_folder_splits_share_the_train_class_order(tmp_path):
    for split in ("train", "test"):
        for cls in ("b", "a"):
            write_image(tmp_path / split / cls / "x.jpg")
    splits = image_folder_splits(tmp_path)
    assert set(splits) == {"train", "test"} and splits["test"].classes == ["a", "b"]
    write_image(tmp_path / "val" / "c" / "x.jpg")
    with pytest.raises(DataError, match="differ from the expected classes"):
        image_folder_splits(tmp_path)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        image_folder(tmp_path / "empty")
    write_image(tmp_path / "d" / "a" / "0.png")
    (tmp_path / "d" / "b").mkdir()
    with pytest.raises(DataError, match="d/b holds no images"):
        image_folder(tmp_path / "d")
    (tmp_path / "d" / "b" / "broken.png").write_bytes(b"\x89PNG garbage")
    ds = image_folder(tmp_path / "d")
    with pytest.raises(DataError, match="cannot decode image .*broken.png"):
        ds[1]


# -- VTAB-1k -----------------------------------------------------------------------------------
def test_vtab_task_table_is_complete():
    assert len(VTAB_TASKS) == 19
    groups = [g for _, g in VTAB_TASKS.values()]
    assert (groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (7, 4, 8)
    assert VTAB_TASKS["cifar"][0] == 100 and VTAB_TASKS["sun397"][0] == 397
    assert VTAB_TASKS["smallnorb_azi"][0] == 18 and VTAB_TASKS["clevr_count"][0] == 8


def make_vtab(root: Path, task="eurosat", lines=None):
    base = root / task
    for i in range(4):
        write_image(base / "images" / f"{i}.jpg", value=40 * i)
    lists = lines or {"train800": ["images/0.jpg 3", "images/1.jpg 9"], "val200": ["images/2.jpg 0"],
                      "train800val200": ["images/0.jpg 3", "images/1.jpg 9", "images/2.jpg 0"],
                      "test": ["images/3.jpg 5"]}
    for split, rows in lists.items():
        (base / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def test_vtab_reads_the_list_files(tmp_path):
    root = make_vtab(tmp_path)
    before = snapshot(root)
    train = vtab_1k(root, "eurosat", "train800", transform=vtab_transform(16))
    assert len(train) == 2 and train.labels.tolist() == [3, 9] and len(train.classes) == 10
    x, y = train[1]
    assert x.shape == (3, 16, 16) and y == 9
    assert len(vtab_1k(root, "eurosat", "train800val200")) == 3
    assert snapshot(root) == before


def test_vtab_errors(tmp_path):
    root = make_vtab(tmp_path)
    with pytest.raises(DataError, match="unknown VTAB-1k task 'eurosat2'"):
        vtab_1k(root, "eurosat2", "test")
    with pytest.raises(DataError, match="unknown VTAB-1k split"):
        vtab_1k(root, "eurosat", "train1000")
    (root / "eurosat" / "val200.txt").unlink()
    with pytest.raises(DataError, match="list file not found: .*val200.txt"):
        vtab_1k(root, "eurosat", "val200")
    (root / "eurosat" / "test.txt").write_text("images/3.jpg 10\n")
    with pytest.raises(DataError, match="label 10 is outside the class range 0..9"):
        vtab_1k(root, "eurosat", "test")
    (root / "eurosat" / "test.txt").write_text("images/3.jpg\n")
    with pytest.raises(DataError, match="test.txt:1: expected 'relative/path label'"):
        vtab_1k(root, "eurosat", "test")
    with pytest.raises(DataError, match="task folder not found"):
        vtab_1k(root, "dtd", "test")


# -- FGVC --------------------------------------------------------------------------------------
def make_fgvc(root: Path, dataset="StanfordDogs", first_label=1):
    num_classes, image_dir = FGVC_DATASETS[dataset]
    base = root / dataset
    annotations = {}
    for c in range(num_classes):
        rel = f"class{c:03d}/img.jpg"
        write_image(base / image_dir / rel, value=c, size=(6, 6))
        annotations[rel] = c + first_label
    (base / "train.json").write_text(json.dumps(annotations))
    (base / "val.json").write_text(json.dumps(dict(list(annotations.items())[:5])))
    (base / "test.json").write_text(json.dumps(dict(list(annotations.items())[-3:])))
    return root


def test_fgvc_reads_vpt_layout_with_contiguous_labels(tmp_path):
    root = make_fgvc(tmp_path)
    before = snapshot(root)
    train = fgvc(root, "StanfordDogs", "train", transform=fgvc_transform(train=True, size=8))
    assert len(train) == 120 and train.labels.min() == 0 and train.labels.max() == 119
    x, _ = train[0]
    assert x.shape == (3, 8, 8)
    test = fgvc(root, "StanfordDogs", "test")
    assert test.labels.tolist() == [117, 118, 119]
    assert snapshot(root) == before


def test_fgvc_errors(tmp_path):
    root = make_fgvc(tmp_path)
    with pytest.raises(DataError, match="unknown FGVC dataset"):
        fgvc(root, "Dogs", "train")
    base = root / "StanfordDogs"
    (base / "test.json").write_text(json.dumps({"class000/img.jpg": 999}))
    with pytest.raises(DataError, match="label 999 does not occur in train.json"):
        fgvc(root, "StanfordDogs", "test")
    (base / "val.json").write_text("{broken")
    with pytest.raises(DataError, match="val.json is not valid JSON"):
        fgvc(root, "StanfordDogs", "val")
    (base / "train.json").write_text(json.dumps({"class000/img.jpg": 1}))
    with pytest.raises(DataError, match="1 distinct labels, StanfordDogs has 120 classes"):
        fgvc(root, "StanfordDogs", "train")
    assert set(FGVC_DATASETS) == {"CUB_200_2011", "nabirds", "OxfordFlower", "StanfordDogs", "StanfordCars"}


# -- archives and arrays -----------------------------------------------------------------------
def test_cifar10_tar_layout(tmp_path):
    files = {f"cifar10/{split}/{cls}/{i:04d}.jpg": image_bytes(30 * i, (32, 32), "JPEG")
             for split in ("train", "test") for cls in ("cat", "airplane") for i in range(2)}
    write_tar(tmp_path / "c.tar.gz", files)
    data = load_cifar10(tmp_path / "c.tar.gz")
    assert data["train"].images.shape == (4, 32, 32, 3) and data["train"].classes == ["airplane", "cat"]
    assert data["test"].labels.tolist() == [0, 0, 1, 1]
    assert load_cifar10(tmp_path / "c.tar.gz")["train"].images.shape == (4, 32, 32, 3)  # from the cache
    write_tar(tmp_path / "bad.tar.gz", {"cifar10/train/cat/0.jpg": b"not a jpeg"})
    with pytest.raises(ValueError, match="cannot decode image 'cifar10/train/cat/0.jpg'"):
        load_cifar10(tmp_path / "bad.tar.gz")


def test_camvid_tar_layout(tmp_path):
    files = {}
    for split in ("train", "val", "test"):
        files[f"camvid/{split}.txt"] = b"a.png\nb.png\n"
        for name in ("a.png", "b.png"):
            files[f"camvid/{split}/{name}"] = image_bytes(100, (6, 4))
            files[f"camvid/{split}annot/{name}"] = image_bytes(11 if name == "a.png" else 3, (6, 4), mode="L")
    write_tar(tmp_path / "camvid.tar.gz", files)
    data = sources.camvid(tmp_path / "camvid.tar.gz")
    assert data["train"]["images"].shape == (2, 4, 6, 3) and data["val"]["masks"].shape == (2, 4, 6)
    assert set(np.unique(data["test"]["masks"])) == {3, 11}
    del files["camvid/val/b.png"]
    write_tar(tmp_path / "broken.tar.gz", files)
    with pytest.raises(DataError, match="camvid/val/b.png is listed in camvid/val.txt but missing"):
        sources.camvid(tmp_path / "broken.tar.gz")


def write_idx(path: Path, array: np.ndarray):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path, monkeypatch):
    for prefix, n in (("train", 5), ("t10k", 3)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.arange(n * 28 * 28).reshape(n, 28, 28) % 256)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("IVPT_FASHION_MNIST", str(tmp_path))
    data = sources.fashion_mnist()
    assert data["train"].images.shape == (5, 28, 28) and data["test"].labels.tolist() == [0, 1, 2]
    assert data["train"].image(0).mode == "RGB"
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        sources.fashion_mnist()
    monkeypatch.setenv("IVPT_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        sources.fashion_mnist()


def test_pneumonia_npz(tmp_path):
    arrays = {f"{s}_images": np.zeros((4, 28, 28), np.uint8) for s in ("train", "val", "test")}
    arrays.update({f"{s}_labels": np.array([[0], [1], [1], [0]], np.uint8) for s in ("train", "val", "test")})
    np.savez(tmp_path / "p.npz", **arrays)
    data = sources.pneumonia_mnist(tmp_path / "p.npz")
    assert data["val"].labels.tolist() == [0, 1, 1, 0] and data["train"].classes == ["normal", "pneumonia"]
    del arrays["test_labels"]
    np.savez(tmp_path / "q.npz", **arrays)
    with pytest.raises(DataError, match="missing array 'test_labels'"):
        sources.pneumonia_mnist(tmp_path / "q.npz")
    arrays["test_labels"] = np.array([0, 1, 2, 0])
    np.savez(tmp_path / "r.npz", **arrays)
    with pytest.raises(DataError, match="label 2 is outside the class range 0..1"):
        sources.pneumonia_mnist(tmp_path / "r.npz")


def test_dtd10_tar_layout(tmp_path):
    files = {f"dtd10/{cls}/{cls}_{i:04d}.jpg": image_bytes(50 * i, (20, 16), "JPEG")
             for cls in ("bumpy", "banded") for i in range(3)}
    write_tar(tmp_path / "dtd.tar.gz", files)
    data = sources.dtd10(tmp_path / "dtd.tar.gz", size=8)
    assert data.images.shape == (6, 8, 8, 3) and data.classes == ["banded", "bumpy"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]


# -- transforms ----------------------------------------------------------------------------------
def test_transforms_follow_the_protocols():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    x = vtab_transform(24, mean=(0.5,) * 3, std=(0.5,) * 3)(image)
    assert x.shape == (3, 24, 24) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(vtab_transform(24)(image), vtab_transform(24)(image))  # no augmentation
    test = fgvc_transform(train=False, size=28)
    assert torch.equal(test(image), test(image)) and test(image).shape == (3, 28, 28)
    train = fgvc_transform(train=True, size=28)
    torch.manual_seed(0)
    assert not all(torch.equal(train(image), train(image)) for _ in range(5))
    cfg = {"input_size": (3, 32, 32), "mean": (0.1, 0.2, 0.3), "std": (0.3, 0.3, 0.3), "interpolation": "bicubic"}
    x = backbone_transform(cfg)(image)
    assert x.shape == (3, 32, 32)


# -- the offline suite ---------------------------------------------------------------------------
def test_procedural_rendering_is_deterministic_and_balanced():
    for task, (_, num_classes, group, classes) in procedural.PROCEDURAL_TASKS.items():
        images, labels = procedural.render(task, 2 * num_classes, seed=5)
        again, labels_again = procedural.render(task, 2 * num_classes, seed=5)
        other, _ = procedural.render(task, 2 * num_classes, seed=6)
        assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
        assert not np.array_equal(images, other)
        assert np.bincount(labels, minlength=num_classes).tolist() == [2] * num_classes
        assert images.shape == (2 * num_classes, 64, 64, 3) and len(classes) == num_classes
        assert group == "structured"


def test_procedural_labels_follow_the_rendered_factor():
    """dSprites-loc: the sprite's centre of mass moves right with the label."""
    rng = np.random.default_rng(0)
    centres = []
    for label in (0, 15):
        xs = []
        for _ in range(20):
            img = procedural.dsprites_loc(label, rng).astype(float).max(axis=2)
            mask = img > img.mean() + 2 * img.std()
            xs.append(np.nonzero(mask)[1].mean())
        centres.append(np.mean(xs))
    assert centres[1] - centres[0] > 30


def test_suite_procedural_task_sizes_and_seed():
    task = load_task("clevr-dist", seed=0)
    assert (len(task.train), len(task.val), len(task.test)) == (800, 200, 2000)
    assert len(task.trainval) == 1000 and task.group == "structured"
    assert np.array_equal(load_task("clevr-dist", seed=0).test.images, task.test.images)  # cached, identical
    with pytest.raises(DataError, match="unknown offline-suite task"):
        load_task("clevr")


def test_summary_means():
    summary = summarize({"dtd10": 0.5, "fashion-mnist": 0.7, "pneumonia": 0.9, "clevr-count": 0.3,
                         "clevr-dist": 0.1})
    assert summary["groups"] == pytest.approx({"natural": 0.6, "specialized": 0.9, "structured": 0.2})
    assert summary["mean_of_group_means"] == pytest.approx(0.5667, abs=1e-4)
    assert summary["plain_mean"] == pytest.approx(0.5)
    assert len(SUITE_TASKS) == 7


def shared_data_available(name):
    from ivpt.data.paths import data_root

    return (data_root() / name).is_file()


@pytest.mark.parametrize("task", ["dtd10", "pneumonia", "fashion-mnist"])
def test_suite_real_tasks(task):
    need = SUITE_TASKS[task][1]
    if task == "fashion-mnist":
        if not Path(os.environ.get("IVPT_FASHION_MNIST", sources.FASHION_MNIST_DIR)).is_dir():
            pytest.skip(f"needs the {need} (apt-get install dataset-fashion-mnist)")
    elif not shared_data_available(need):
        pytest.skip(f"needs {need} in the shared data folder ($IVPT_DATA or ../shared/data)")
    data = load_task(task, seed=0)
    sizes = {"dtd10": (800, 200, 200), "pneumonia": (800, 200, 468), "fashion-mnist": (800, 200, 2000)}[task]
    assert (len(data.train), len(data.val), len(data.test)) == sizes
    again = load_task(task, seed=0)
    assert np.array_equal(again.val.images, data.val.images)
    # disjoint: no image of val or test also sits in train (compare raw bytes)
    train_keys = {img.tobytes() for img in data.train.images}
    assert sum(img.tobytes() in train_keys for img in data.val.images) <= 2  # allow true duplicates in the source
    assert np.bincount(data.train.labels).min() > 0


def test_procedural_version_1_is_unchanged():
    """Version 1 is what every published suite figure was measured on: its pixels must never move."""
    import hashlib

    pinned = {"dsprites-loc": "e0e8b6ee9cb1a0c3", "dsprites-ori": "bb0e77b345c9e523",
              "clevr-count": "86447f69ef619f77", "clevr-dist": "316b2a9347255960"}
    for task, digest in pinned.items():
        images, labels = procedural.render(task, 16, seed=5)
        assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16] == digest, task


def test_procedural_version_2_is_deterministic_balanced_and_at_patch_resolution():
    for task, (_, num_classes, group, classes) in procedural.PROCEDURAL_TASKS_V2.items():
        images, labels = procedural.render(task, 2 * num_classes, seed=5, version=2)
        again, _ = procedural.render(task, 2 * num_classes, seed=5, version=2)
        assert np.array_equal(images, again) and images.shape == (2 * num_classes, 64, 64, 3)
        assert np.bincount(labels, minlength=num_classes).tolist() == [2] * num_classes and len(classes) == num_classes
        assert not np.array_equal(images, procedural.render(task, 2 * num_classes, seed=5)[0])  # not version 1
    assert procedural.PROCEDURAL_TASKS_V2["dsprites-loc"][1] == 8  # one bin per patch column of an 8 x 8 grid
    rng = np.random.default_rng(0)
    centres = []
    for label in range(8):
        img = np.stack([procedural.PROCEDURAL_TASKS_V2["dsprites-loc"][0](label, rng) for _ in range(10)])
        bright = img.astype(float).max(axis=3)
        centres.append(np.mean([np.nonzero(b > b.mean() + 2 * b.std())[1].mean() for b in bright]))
    assert all(b > a for a, b in zip(centres, centres[1:]))  # the sprite moves right bin by bin
    with pytest.raises(ValueError, match="versions 1, 2"):
        procedural.render("dsprites-loc", 4, seed=0, version=3)


def few_images_per_split(monkeypatch):
    """Procedural tasks drawn at 64 / 32 / 32 images (every class of the 16-class tasks present) for tests of
    what does not depend on the counts; test_suite_procedural_task_sizes_and_seed checks the suite's own."""
    from ivpt.data import suite

    for name, count in (("TRAIN", 64), ("VAL", 32), ("TEST_MAX", 32)):
        monkeypatch.setattr(suite, name, count)


def test_suite_versions_are_cached_apart_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("IVPT_CACHE", str(tmp_path))
    few_images_per_split(monkeypatch)
    v1, v2 = load_task("dsprites-loc", seed=3), load_task("dsprites-loc", seed=3, version=2)
    assert len(v1.classes) == 16 and len(v2.classes) == 8
    assert {p.name for p in tmp_path.iterdir()} == {"suite-dsprites-loc-v1-seed3.npz", "suite-dsprites-loc-v2-seed3.npz"}
    assert np.array_equal(load_task("dsprites-loc", seed=3, version=2).val.images, v2.val.images)
    with pytest.raises(DataError, match="offline-suite version 9 is unknown"):
        load_task("dsprites-loc", version=9)


def test_find_shape_knows_where_its_target_is(tmp_path, monkeypatch):
    images, labels, boxes = procedural.render("find-shape", 8, seed=2)
    assert np.bincount(labels).tolist() == [2, 2, 2, 2] and boxes.shape == (8, 4)
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    for image, box in zip(images, boxes):  # the target's box holds object pixels, brighter than the background
        x0, y0, x1, y1 = (box * 64).round().astype(int)
        inside = image[y0:y1 + 1, x0:x1 + 1].max(axis=2)
        assert inside.max() > np.median(image.max(axis=2)) + 60
    assert procedural.box_patches([0.0, 0.0, 0.1, 0.1], (8, 8)).tolist() == [0]
    assert procedural.box_patches([0.2, 0.45, 0.3, 0.6], (8, 8)).tolist() == [25, 26, 33, 34]
    assert procedural.box_patches([0.9, 0.9, 1.0, 1.0], (8, 8)).tolist() == [63]
    monkeypatch.setenv("IVPT_CACHE", str(tmp_path))
    few_images_per_split(monkeypatch)
    task = load_task("find-shape", seed=0)
    assert task.group == "mechanism" and task.classes == procedural.TARGET_KINDS
    assert task.boxes["test"].shape == (len(task.test), 4) and len(task.boxes["trainval"]) == len(task.trainval)
    assert "find-shape" not in SUITE_TASKS  # outside the suite's means


def test_sixteen_bit_greyscale_keeps_its_values_and_undefined_ranges_are_refused(tmp_path):
    from ivpt.data.datasets import open_rgb

    values = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "xray.png")  # a 16-bit PNG (Pillow: mode I;16 or I)
    rgb = np.asarray(open_rgb(tmp_path / "xray.png"))
    assert rgb.shape == (2, 2, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[..., 0].tolist() == [[0, 4], [117, 255]]  # scaled by 255/65535; Pillow alone gives 0, 255, 255, 255
    import ivpt.data.datasets as datasets

    datasets._WARNED_NARROW.clear()
    Image.fromarray(np.array([[0, 4095]], dtype=np.uint16)).save(tmp_path / "12bit.png")  # a 12-bit sensor's range
    with pytest.warns(UserWarning, match=r"12bit\.png: a 16-bit image whose values reach only 4095 \(12-bit data\?\)"):
        assert np.asarray(open_rgb(tmp_path / "12bit.png"))[0, 1, 0] == 16  # read as 16-bit: dark
    Image.fromarray(np.array([[0.5, 2.0]], dtype=np.float32)).save(tmp_path / "depth.tif")
    with pytest.raises(DataError, match=r"depth\.tif: mode F .* has no known range"):
        open_rgb(tmp_path / "depth.tif")


def test_image_folder_skips_hidden_files_and_reads_jfif(tmp_path):
    write_image(tmp_path / "data" / "cat" / "a.png")
    write_image(tmp_path / "data" / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png")  # a notebook's copy
    write_image(tmp_path / "data" / "cat" / "._a.png")  # macOS resource fork
    write_image(tmp_path / "data" / "cat" / "more" / "b.png")  # a plain subfolder is still the class's
    (tmp_path / "data" / "dog").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "data" / "dog" / "c.jfif", format="JPEG")
    ds = image_folder(tmp_path / "data")
    assert sorted(item for item, _ in ds.items) == ["cat/a.png", "cat/more/b.png", "dog/c.jfif"]


def test_photos_are_read_upright_as_viewers_show_them_and_benchmarks_keep_the_stored_pixels(tmp_path):
    from ivpt.data.datasets import open_rgb

    oriented_jpeg(tmp_path / "folder" / "cat" / "portrait.jpg")
    write_image(tmp_path / "folder" / "dog" / "b.png")
    upright = np.asarray(open_rgb(tmp_path / "folder" / "cat" / "portrait.jpg"))
    assert upright.shape == (16, 8, 3)  # portrait, as shown
    assert upright[:6].mean() < 30 and upright[10:].mean() > 225  # the stored left half is now on top
    stored = np.asarray(open_rgb(tmp_path / "folder" / "cat" / "portrait.jpg", upright=False))
    assert stored.shape == (8, 16, 3) and stored[:, :6].mean() < 30
    ds = image_folder(tmp_path / "folder")
    assert ds.upright and ds[0][0].size == (8, 16)  # a user's folder: upright
    root = make_vtab(tmp_path / "vtab")
    rel = vtab_1k(root, "eurosat", "train800").items[0][0]
    oriented_jpeg(root / "eurosat" / rel)  # same name and format, now tagged
    bench = vtab_1k(root, "eurosat", "train800")
    assert not bench.upright and bench[0][0].size == (16, 8)  # the published protocol's reading


def test_a_folder_with_photos_in_a_format_ivpt_cannot_read_is_refused_and_predict_reports_them(tmp_path):
    from ivpt.api import image_files, read_images
    from ivpt.data.datasets import UNREADABLE_IMAGE_SUFFIXES

    assert ".heic" in UNREADABLE_IMAGE_SUFFIXES
    write_image(tmp_path / "data" / "cat" / "a.png")
    write_image(tmp_path / "data" / "dog" / "b.png")
    (tmp_path / "data" / "dog" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")  # an iPhone photo
    with pytest.raises(DataError, match=r"class folder .*dog holds 1 image\(s\) in a format ivpt cannot read "
                                        r"\(IMG_0001\.HEIC\): convert them to JPEG or PNG"):
        image_folder(tmp_path / "data")
    files = image_files([str(tmp_path / "data")])
    assert [f.name for f in files] == ["a.png", "IMG_0001.HEIC", "b.png"]
    readable, skipped = read_images(files, strict=False, transform=None)
    assert len(readable) == 2 and [Path(s["image"]).name for s in skipped] == ["IMG_0001.HEIC"]
    assert ".HEIC is not a format ivpt reads: convert it to JPEG or PNG" in skipped[0]["error"]


def test_avif_photos_are_read_where_pillow_decodes_them(tmp_path):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")  # then .avif is refused like .heic (previous test)
    write_image(tmp_path / "data" / "cat" / "a.png")
    (tmp_path / "data" / "dog").mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(tmp_path / "data" / "dog" / "b.avif")
    ds = image_folder(tmp_path / "data")
    assert [item for item, _ in ds.items] == ["cat/a.png", "dog/b.avif"]
    assert abs(float(np.asarray(ds[1][0]).mean()) - 200) < 8


def test_a_cache_built_by_an_older_decoder_is_not_reused(tmp_path, monkeypatch):
    """The cache key carries the decoder's version: files decoded otherwise by an older ivpt (16-bit
    greyscale clipped white) must not be served as this one's pixels."""
    import ivpt.data.cache as cache
    from ivpt.data.datasets import ImageListDataset

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    data = ImageListDataset(tmp_path, [("a.png", 0)], ["x"])
    now = cache.cache_key(data, [])
    monkeypatch.setattr(cache, "DECODER_VERSION", cache.DECODER_VERSION - 1)
    assert cache.cache_key(data, []) != now
