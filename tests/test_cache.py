"""The decoded-tensor cache: the uncached transform's numbers, keyed so it is never stale, shared safely."""
import json
import multiprocessing as mp

import numpy as np
import pytest
import torch
from PIL import Image

from ivpt.data.cache import CachedImages, cached, to_device
from ivpt.data.datasets import ImageListDataset
from ivpt.data.transforms import fgvc_transform, folder_transform, vtab_transform

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def make_jpegs(root, n=6, size=(40, 30)):
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = root / f"c{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
        items.append((f"c{i % 2}/{i}.jpg", i % 2))
    return items


def dataset(root, items, transform):
    return ImageListDataset(root, items, ["c0", "c1"], transform)


def batch_of(ds, device="cpu"):
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return to_device(images, ds, torch.device(device))


@pytest.mark.parametrize("transform", [vtab_transform(24, MEAN, STD, "bicubic"), fgvc_transform(False, 24, MEAN, STD),
                                       folder_transform({"input_size": (3, 24, 24), "mean": MEAN, "std": STD,
                                                         "crop_pct": 0.9, "interpolation": "bicubic"})])
def test_cached_tensors_equal_the_uncached_transform(tmp_path, transform):
    items = make_jpegs(tmp_path / "img")
    plain = dataset(tmp_path / "img", items, transform)
    served = cached(plain, tmp_path / "cache")
    assert isinstance(served, CachedImages) and served[0][0].dtype == torch.uint8  # decoded once, uint8
    expected = torch.stack([plain[i][0] for i in range(len(plain))])
    got = batch_of(served)
    assert got.dtype == expected.dtype and torch.allclose(got, expected, atol=1e-6)
    assert [served[i][1] for i in range(len(served))] == [label for _, label in items]
    assert torch.equal(batch_of(served.to_device(torch.device("cpu"))), got)  # the on-device copy


def test_resampling_augmentation_is_not_cached(tmp_path):
    items = make_jpegs(tmp_path / "img")
    augment = folder_transform({"input_size": (3, 24, 24), "mean": MEAN, "std": STD}, augment=True)  # RandomResizedCrop
    augmenting = dataset(tmp_path / "img", items, augment)
    assert cached(augmenting, tmp_path / "cache") is augmenting


def test_crops_and_flips_act_on_the_cached_decoded_images_exactly(tmp_path):
    """FGVC's train pipeline (resize keeping the aspect ratio, random crop, flip): the resized images of
    varying sizes are cached, the crop and flip draw the same numbers per access as on the PIL image."""
    items = make_jpegs(tmp_path / "img", n=8)
    for i, (rel, _) in enumerate(items[:3]):  # other aspect ratios: the resized images differ in size
        Image.fromarray(np.full((30 + 7 * i, 50, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "img" / rel)
    plain = dataset(tmp_path / "img", items, fgvc_transform(True, 24, MEAN, STD))
    served = cached(plain, tmp_path / "cache")
    assert isinstance(served, CachedImages) and served.shapes is not None
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        expected = torch.stack([plain[i][0] for i in range(len(plain))])
        torch.manual_seed(seed)
        assert torch.allclose(batch_of(served), expected, atol=1e-6)


def test_a_changed_file_size_or_transform_builds_a_new_cache(tmp_path):
    items = make_jpegs(tmp_path / "img")
    first = cached(dataset(tmp_path / "img", items, vtab_transform(24, MEAN, STD)), tmp_path / "cache")
    again = cached(dataset(tmp_path / "img", items, vtab_transform(24, MEAN, STD)), tmp_path / "cache")
    assert first.path == again.path  # reused
    bigger = cached(dataset(tmp_path / "img", items, vtab_transform(32, MEAN, STD)), tmp_path / "cache")
    other = cached(dataset(tmp_path / "img", items, vtab_transform(24, MEAN, STD, "bicubic")), tmp_path / "cache")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "img" / items[0][0])  # same name, new content
    changed = cached(dataset(tmp_path / "img", items, vtab_transform(24, MEAN, STD)), tmp_path / "cache")
    assert len({first.path, bigger.path, other.path, changed.path}) == 4
    assert tuple(bigger[0][0].shape) == (3, 32, 32)
    red = batch_of(changed)[0]
    from ivpt.data.datasets import open_rgb
    assert torch.allclose(red, vtab_transform(24, MEAN, STD)(open_rgb(tmp_path / "img" / items[0][0])), atol=1e-6)


def test_a_corrupt_cache_is_rebuilt_with_a_warning(tmp_path):
    items = make_jpegs(tmp_path / "img")
    ds = dataset(tmp_path / "img", items, vtab_transform(24, MEAN, STD))
    good = batch_of(cached(ds, tmp_path / "cache"))
    path = cached(ds, tmp_path / "cache").path
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # one flipped byte in the pixels
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged or incomplete; rebuilding"):
        rebuilt = cached(ds, tmp_path / "cache")
    assert torch.equal(batch_of(rebuilt), good)
    path.with_suffix(".json").write_text("{")  # a torn record
    with pytest.warns(UserWarning, match="rebuilding"):
        assert torch.equal(batch_of(cached(ds, tmp_path / "cache")), good)


def _build(args):
    root, cache, items = args
    from ivpt.data.cache import cached as build
    from ivpt.data.datasets import ImageListDataset as Images
    from ivpt.data.transforms import vtab_transform as vt

    served = build(Images(root, items, ["c0", "c1"], vt(24, MEAN, STD)), cache)
    return str(served.path)


def test_two_processes_building_one_cache_give_one_valid_cache(tmp_path):
    items = make_jpegs(tmp_path / "img", n=40)
    with mp.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_build, [(tmp_path / "img", tmp_path / "cache", items)] * 2)
    assert paths[0] == paths[1]
    files = sorted(p.name for p in (tmp_path / "cache" / "tensors").iterdir() if not p.name.startswith("."))
    assert len(files) == 2  # one .npy and its .json record, no second copy, no temporaries
    record = json.loads((tmp_path / "cache" / "tensors" / files[0]).read_text())
    assert record["count"] == 40
    ds = dataset(tmp_path / "img", items, vtab_transform(24, MEAN, STD))
    assert torch.allclose(batch_of(cached(ds, tmp_path / "cache")), torch.stack([ds[i][0] for i in range(40)]),
                          atol=1e-6)


def test_training_from_the_cache_equals_training_without_it(tmp_path, monkeypatch):
    """A folder run with the cache = without it; two runs from the cache are bit-identical."""
    from safetensors.torch import load_file, save_file
    from conftest import TINY_MINI as TINY, config, make_folder

    import timm
    from ivpt.engine.loop import train

    monkeypatch.setenv("IVPT_CACHE", str(tmp_path / "cache"))
    folder = make_folder(tmp_path / "data")
    torch.manual_seed(0)
    save_file(timm.create_model("vit_mini_patch4_32", **TINY).state_dict(), str(tmp_path / "backbone.safetensors"))
    runs = {}
    for name, setting in (("plain", "off"), ("cached", "auto"), ("again", "auto")):
        runs[name] = train(config(tmp_path, folder, output=str(tmp_path / name), cache=setting, epochs=2), quiet=True)
    assert list((tmp_path / "cache" / "tensors").glob("*.npy"))  # the cache was used
    tensors = {name: load_file(str(tmp_path / name / "adapter" / "adapter.safetensors")) for name in runs}
    for key in tensors["plain"]:
        assert torch.allclose(tensors["plain"][key], tensors["cached"][key], atol=1e-5), key
        assert torch.equal(tensors["cached"][key], tensors["again"][key]), key
    assert runs["plain"]["val"]["top1"] == runs["cached"]["val"]["top1"] == runs["again"]["val"]["top1"]


def test_linear_probe_on_cached_features_equals_the_full_model_path(tmp_path, monkeypatch):
    """method linear: the head trained on features computed once = the head trained through the backbone."""
    from safetensors.torch import load_file, save_file
    from conftest import TINY_MINI as TINY, config, make_folder

    import timm
    from ivpt.engine.loop import train

    monkeypatch.setenv("IVPT_CACHE", str(tmp_path / "cache"))
    folder = make_folder(tmp_path / "data")
    torch.manual_seed(0)
    save_file(timm.create_model("vit_mini_patch4_32", **TINY).state_dict(), str(tmp_path / "backbone.safetensors"))
    common = dict(method="linear", method_options={}, epochs=3, lr=0.5)
    runs = {name: train(config(tmp_path, folder, output=str(tmp_path / name), cache=setting, **common), quiet=True)
            for name, setting in (("plain", "off"), ("features", "auto"), ("again", "auto"))}
    stored = list((tmp_path / "cache" / "features").glob("*.safetensors"))
    assert len(stored) == 2  # train and val, computed once and reused by the second run
    heads = {name: load_file(str(tmp_path / name / "adapter" / "adapter.safetensors")) for name in runs}
    for key in heads["plain"]:
        assert torch.allclose(heads["plain"][key], heads["features"][key], atol=1e-5), key
        assert torch.equal(heads["features"][key], heads["again"][key])
    for a, b in zip(runs["plain"]["log"], runs["features"]["log"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5) and a["val_top1"] == b["val_top1"]
    # other backbone weights: other features, never the stale ones
    torch.manual_seed(1)
    save_file(timm.create_model("vit_mini_patch4_32", **TINY).state_dict(), str(tmp_path / "backbone.safetensors"))
    train(config(tmp_path, folder, output=str(tmp_path / "other"), cache="auto", **common), quiet=True)
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 4


def test_the_cache_reads_photos_upright_as_the_dataset_does_and_keys_the_reading(tmp_path):
    items = make_jpegs(tmp_path / "img")
    exif = Image.Exif()
    exif[0x0112] = 8  # a phone's portrait tag: the viewer turns the stored pixels 90 degrees anticlockwise
    Image.fromarray(np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (30, 1, 3))).save(
        tmp_path / "img" / items[0][0], exif=exif, quality=95)
    transform = fgvc_transform(False, 24, MEAN, STD)
    for upright in (True, False):
        plain = ImageListDataset(tmp_path / "img", items, ["c0", "c1"], transform, upright=upright)
        served = cached(plain, tmp_path / "cache")
        assert isinstance(served, CachedImages)
        assert torch.allclose(batch_of(served), torch.stack([plain[i][0] for i in range(len(plain))]), atol=1e-6)
    upright_path = cached(dataset(tmp_path / "img", items, transform), tmp_path / "cache").path
    stored_path = cached(ImageListDataset(tmp_path / "img", items, ["c0", "c1"], transform, upright=False),
                         tmp_path / "cache").path
    assert upright_path != stored_path
    turned = batch_of(cached(dataset(tmp_path / "img", items, transform), tmp_path / "cache"))[0]
    kept = batch_of(cached(ImageListDataset(tmp_path / "img", items, ["c0", "c1"], transform, upright=False),
                           tmp_path / "cache"))[0]
    assert not torch.allclose(turned, kept, atol=0.1)  # the gradient runs down one, across the other
