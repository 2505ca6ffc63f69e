"""ONNX export (issue 35): every method's file gives onnxruntime the eager logits, carries what a consumer
needs, and ivpt predict --onnx answers as ivpt predict does."""
import json
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TINY_MINI, photo_folder, randomize

import ivpt
import ivpt.adapter_format
import ivpt.deploy
import ivpt.methods
from ivpt.cli import main
from ivpt.deploy import OnnxFileError, read_metadata

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = [(m, {}) for m in ivpt.methods.METHODS] + [
    ("ivpt", {"da": da}) for da in ("channel", "static", "sum")] + [("ivpt", {"ar_source": "prompts"})]
# every method and iVPT variant on a small 224 px ViT: ViT-B/16's 196 patches (AR's top-k and DA over that many
# tokens), three blocks so that the cross-layer methods export two transitions. The shipped backbone is the same
# timm architecture at 32 px: the default method here, iVPT and linear in the tests below; every method on it
# too doubled this file's cost for no path of its own
EXPORTS = [pytest.param("vit-224", method, options, id="vit-224-" + method + "".join(
    f"[{k}={v}]" for k, v in options.items())) for method, options in METHODS] + [
    pytest.param("shipped", "ivpt", {}, id="shipped-ivpt")]


def small_vit_224():
    """A small timm ViT at 224 px (three blocks, width 32): the patch grid of ViT-B/16 at a fraction of its cost."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", depth=3, embed_dim=32, num_heads=2)


@pytest.mark.filterwarnings("ignore:the model records no dataset")  # a fresh model: VTAB's reading, as said
@pytest.mark.parametrize("backbone,method,options", EXPORTS)
def test_onnxruntime_gives_the_eager_logits_at_any_batch(backbone, method, options, tmp_path):
    vit = "vit_mini_patch4_32.ivpt_cifar10" if backbone == "shipped" else small_vit_224()
    model = randomize(ivpt.create_model(vit, method, 5, class_names=list("abcde"), **options), scale=0.1).eval()
    size = model.adapter_config()["image_size"][-1]
    meta = model.export_onnx(tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # one file, a dynamic batch
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            eager = model(images).numpy()
        onnx = session.run(None, {"images": images.numpy()})[0]
        assert onnx.shape == eager.shape and np.abs(onnx - eager).max() < 1e-4, (method, batch)
    assert read_metadata(tmp_path / "m.onnx") == json.loads(json.dumps(meta))  # round trip
    assert meta["class_names"] == list("abcde") and meta["method"] == method and meta["options"] == {
        **meta["options"], **options}
    assert meta["merged"] == (method in ("lora", "ssf", "bitfit", "linear", "full"))
    assert meta["adapter_sha256"] == ivpt.adapter_format.tensors_digest(
        {k: v.detach().contiguous() for k, v in model.adapter_tensors().items()})


def shared_images(archive: str, out: Path, pick, count: int) -> Path:
    """The first ``count`` of the members ``pick`` chooses from a ../shared/data archive's member names,
    extracted flat into ``out`` (skipped where the archive is not there)."""
    path = SHARED / archive
    if not path.is_file():
        pytest.skip(f"needs {path}")
    out.mkdir()
    with tarfile.open(path) as tar:
        for name in pick(tar.getnames())[:count]:
            (out / Path(name).name).write_bytes(tar.extractfile(name).read())
    return out


def dtd_images(tmp_path, count=6) -> Path:
    """A few real photos from ../shared/data (DTD, 256 px): every 97th, so several classes."""
    return shared_images("dtd10-256.tar.gz", tmp_path / "photos",
                         lambda names: [n for n in names if n.endswith(".jpg")][::97], count)


@pytest.mark.parametrize("kind", ["vtab", "folder"])
def test_predict_onnx_answers_as_predict_on_real_photos(kind, folder_adapter, tmp_path, capsys):
    """VTAB-1k's square resize (an adapter without a folder) and a folder's resize + crop."""
    if kind == "vtab":
        model = randomize(ivpt.create_model("vit_mini_patch4_32.ivpt_cifar10", "ivpt", 4,
                                            class_names=["w", "x", "y", "z"]), scale=0.2)
        model.save_adapter(tmp_path / "adapter", data={"kind": "vtab", "root": "x", "task": "dtd"})
    else:
        shutil.copytree(folder_adapter, tmp_path / "adapter")
    photos = dtd_images(tmp_path)
    assert main(["export", str(tmp_path / "adapter"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    said = capsys.readouterr().out
    assert "opset 18" in said and "ivpt predict --onnx" in said
    assert main(["predict", str(tmp_path / "adapter"), str(photos), "--top-k", "3",
                 "--output", str(tmp_path / "torch.json")]) == 0
    assert main(["predict", "--onnx", str(tmp_path / "m.onnx"), str(photos), "--top-k", "3",
                 "--output", str(tmp_path / "onnx.json")]) == 0
    eager = json.loads((tmp_path / "torch.json").read_text())["predictions"]
    onnx = json.loads((tmp_path / "onnx.json").read_text())
    assert onnx["runtime"] == "onnxruntime" and len(onnx["predictions"]) == len(eager) == 6
    assert read_metadata(tmp_path / "m.onnx")["preprocess"]["crop"] == (32 if kind == "folder" else None)
    for a, b in zip(eager, onnx["predictions"]):
        assert a["image"] == b["image"] and [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]]
        assert all(abs(s["score"] - t["score"]) <= 1e-4 for s, t in zip(a["top_k"], b["top_k"]))


@pytest.fixture(scope="module")
def folder_adapter(tmp_path_factory):
    """A vpt-deep adapter trained one epoch on a folder of photos, read with EXIF orientation off and a
    recorded resize of 40 (shorter side) then a 32 px centre crop (trained once for the module)."""
    import timm
    from safetensors.torch import save_file

    import ivpt.backbones  # noqa: F401  (registers vit_mini_patch4_32 with timm)

    work = tmp_path_factory.mktemp("folder-adapter")
    torch.manual_seed(0)
    save_file(timm.create_model("vit_mini_patch4_32", **TINY_MINI).state_dict(), str(work / "backbone.safetensors"))
    photo_folder(work / "train-photos", per_class=6, size=(48, 36))
    assert main(["train", "--set", "backbone=vit_mini_patch4_32", "backbone_options={embed_dim: 32, depth: 2, "
                 "num_heads: 2}", f"weights={work / 'backbone.safetensors'}", "method=vpt-deep",
                 "method_options={prompt_length: 2}", "epochs=1", "warmup_epochs=0", "batch_size=8",
                 f"data={{root: {work / 'train-photos'}, resize: 40, exif_orientation: false}}",
                 "--output", str(work / "run")]) == 0
    with torch.no_grad():  # trained-looking: one epoch at a small lr barely moves the prompts
        adapter = work / "run" / "adapter"
        model = randomize(ivpt.load_adapter(adapter), scale=0.2)
        model.save_adapter(adapter, data=ivpt.adapter.read_adapter_config(adapter)["data"])
    return adapter


def test_a_folder_adapters_reading_travels_in_the_file(folder_adapter, tmp_path):
    """The file says what the adapter's run did (resize 40, crop 32, stored pixels), and the pipeline built
    from it gives the training pipeline's tensors (ivpt.data.transforms.folder_transform), not merely its own."""
    from PIL import Image

    from ivpt.data.transforms import folder_transform
    from ivpt.deploy import transform_of

    model = ivpt.load_adapter(folder_adapter)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        meta = model.export_onnx(tmp_path / "m.onnx")  # a loaded adapter carries its own reading
    assert not [w for w in said if "records no dataset" in str(w.message)]
    pre = meta["preprocess"]
    assert (pre["resize"], pre["crop"], pre["exif_orientation"]) == (40, 32, False)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    cfg = {**model.backbone.pretrained_cfg, "input_size": (3, 32, 32)}
    assert torch.equal(transform_of(pre)(photo), folder_transform(cfg, "crop", resize=40)(photo))


def test_segmentation_masks_agree(tmp_path):
    from PIL import Image

    from ivpt.api import predict_masks
    from ivpt.deploy import OnnxModel
    from ivpt.segmentation import create_segmentation_model

    images = shared_images("camvid-240x180.tar.gz", tmp_path / "street",
                           lambda names: [n for n in names if n.startswith("camvid/test/") and n.endswith(".png")], 2)
    model = randomize(create_segmentation_model("vit_mini_patch4_32.ivpt_cifar10", "ivpt", 6, crop_size=48,
                                                decoder="pup", decoder_channels=16), scale=0.1).eval()
    # 240 x 180 photos rescaled to 52 x 40: windows 40 high and 48 wide, not the 48 x 48 of the example input
    config = {**model.adapter_config(), "data": {"kind": "camvid"}, "segmentation": {"base_size": [60, 40]}}
    ivpt.deploy.export_onnx(model, tmp_path / "seg.onnx", config)
    files = sorted(images.iterdir())
    assert predict_masks(model, config, files, tmp_path / "torch") == []
    onnx = OnnxModel(tmp_path / "seg.onnx")
    shapes, run = [], onnx.session.run
    onnx.session = type("Recorder", (), {"run": lambda self, names, feed: shapes.append(
        next(iter(feed.values())).shape) or run(names, feed)})()
    assert predict_masks(onnx, onnx.predict_config(), files, tmp_path / "onnx") == []
    assert shapes and all(s[2:] == (40, 48) for s in shapes)
    for f in files:
        a = np.asarray(Image.open(tmp_path / "torch" / f"{f.stem}_mask.png"))
        b = np.asarray(Image.open(tmp_path / "onnx" / f"{f.stem}_mask.png"))
        assert a.shape[:2] == (180, 240) and (a == b).all(-1).mean() >= 0.999


def test_damaged_and_foreign_files_are_named(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "foreign.onnx"))
    with pytest.raises(OnnxFileError, match="without ivpt's metadata"):
        read_metadata(tmp_path / "foreign.onnx")
    ivpt.create_model("vit_mini_patch4_32.ivpt_cifar10", "linear", 3).export_onnx(tmp_path / "m.onnx")
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    code = main(["predict", "--onnx", str(tmp_path / "cut.onnx"), str(tmp_path)])
    assert code == 2 and "cut.onnx is not a readable ONNX file" in capsys.readouterr().err
    (tmp_path / "text.onnx").write_text("hello")
    with pytest.raises(OnnxFileError, match="not a readable ONNX file"):
        read_metadata(tmp_path / "text.onnx")
    with pytest.raises(OnnxFileError, match="is a folder"):
        read_metadata(tmp_path)
    for key, value, named in (("ivpt.format_version", "99", "newer ivpt"), ("ivpt.class_names", "[unclosed", "damaged"),
                              ("ivpt.preprocess", None, "lacks preprocess")):
        proto = onnx.load(str(tmp_path / "m.onnx"))
        props = [p for p in proto.metadata_props if p.key != key]
        del proto.metadata_props[:]
        proto.metadata_props.extend(props)
        if value is not None:
            proto.metadata_props.add(key=key, value=value)
        onnx.save_model(proto, str(tmp_path / "altered.onnx"))
        with pytest.raises(OnnxFileError, match=named):
            read_metadata(tmp_path / "altered.onnx")
    assert main(["export", "x", "--onnx", str(tmp_path / "m.pt")]) == 2
    assert "expected a .onnx file name" in capsys.readouterr().err


def test_the_docs_example_runs_with_onnxruntime_alone(folder_adapter, tmp_path):
    """The usage page's plain Python: no torch, no ivpt; a folder adapter's shorter-side resize and centre
    crop on photos wider and taller than high; the eager model's top class and score."""
    model = ivpt.load_adapter(folder_adapter).eval()
    model.export_onnx(tmp_path / "model.onnx")
    photos = dtd_images(tmp_path, count=3)
    from PIL import Image

    for i, photo in enumerate(sorted(photos.iterdir())[:2]):  # one landscape, one portrait
        image = Image.open(photo)
        image.crop((0, 0, image.width, image.height // 2) if i == 0 else (0, 0, image.width // 2, image.height)
                   ).save(photo)
    page = (ROOT / "docs" / "usage.md").read_text()
    code = re.search(r"## Deploy with ONNX.*?```python\n(.*?)```", page, re.DOTALL).group(1)
    assert "import torch" not in code and "ivpt" not in code.replace("ivpt.", "")
    script = ("import sys\nsys.modules['torch'] = None  # importing torch would fail: the example must not need it\n"
              + code)
    for photo in sorted(photos.iterdir()):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.onnx"), str(photo)],
                              capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        label, score = done.stdout.split()
        from ivpt.data.datasets import open_rgb
        from ivpt.data.transforms import folder_transform

        cfg = {**model.backbone.pretrained_cfg, "input_size": (3, 32, 32)}
        image = folder_transform(cfg, "crop", resize=40)(open_rgb(photo, False))  # as the run read its photos
        with torch.no_grad():
            probs = model(image[None]).softmax(-1)[0]
        assert label == model.class_names[int(probs.argmax())] and abs(float(score) - float(probs.max())) <= 1e-3


def test_a_method_the_exporter_refuses_says_why(tmp_path, monkeypatch, capsys):
    """No method of today fails, so the exporter's refusal is provoked: the message names the method and the
    exporter's reason, and the way forward; nothing is written."""
    def refuse(*args, **kwargs):
        raise RuntimeError("Dynamic control flow is not supported\nmore lines")

    ivpt.create_model("vit_mini_patch4_32.ivpt_cifar10", "adapter", 3).save_adapter(tmp_path / "a")
    monkeypatch.setattr(torch.onnx, "export", refuse)
    code = main(["export", str(tmp_path / "a"), "--onnx", str(tmp_path / "a.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "method 'adapter' could not be exported to ONNX by torch.onnx.export (RuntimeError: " \
        "Dynamic control flow is not supported); share the adapter folder instead" in err
    assert not (tmp_path / "a.onnx").exists()
