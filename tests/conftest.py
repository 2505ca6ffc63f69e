import copy
import os
import tempfile

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

# the decoded-tensor cache of the runs the tests start: a fresh folder, never the user's ~/.cache/ivpt
os.environ.setdefault("IVPT_CACHE", tempfile.mkdtemp(prefix="ivpt-test-cache-"))


def make_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """A tiny random-weight timm ViT; perturbed so that no weight sits at a special value."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=7, qkv_bias=True)
    cfg.update(overrides)
    torch.manual_seed(seed)
    vit = VisionTransformer(**cfg)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # timm inits cls/pos/bias near zero: make them matter
    return vit.eval()


@pytest.fixture
def vit():
    return make_vit()


@pytest.fixture
def images():
    torch.manual_seed(123)
    return torch.randn(3, 3, 32, 32)


def clone(module):
    return copy.deepcopy(module)


TINY_MINI = {"embed_dim": 32, "depth": 2, "num_heads": 2}  # vit_mini_patch4_32 made small for fast runs


def photo_folder(root, classes=("cat", "dog", "owl"), per_class=10, size=(40, 40)):
    """A flat folder of random photos, one subfolder per class (``root/<class>/<i>.jpg``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        for i in range(per_class):
            path = root / name / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return root


@pytest.fixture
def tiny_weights(tmp_path):
    """A weights file of a small random vit_mini_patch4_32 (TINY_MINI), and the --set overrides that use it."""
    import timm
    from safetensors.torch import save_file

    import ivpt.backbones  # noqa: F401  (registers vit_mini_patch4_32 with timm)

    torch.manual_seed(0)
    path = tmp_path / "backbone.safetensors"
    save_file(timm.create_model("vit_mini_patch4_32", **TINY_MINI).state_dict(), str(path))
    return path, ["backbone=vit_mini_patch4_32", "backbone_options={embed_dim: 32, depth: 2, num_heads: 2}",
                  f"weights={path}"]


def randomize(model, scale=0.3, seed=1):
    """Move every tuned tensor away from its start (trained-looking, not the zero or identity initialisation
    that hides mistakes), so that each method's change is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


# -- helpers shared by several test modules (import them from here, never from another test module) --------


def image_bytes(value: int, size=(8, 8), fmt="PNG", mode="RGB") -> bytes:
    """One plain image of a single grey value, encoded as a file of the given format."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, files: dict[str, bytes]):
    """A .tar.gz holding ``files`` (member name -> bytes), as the datasets' downloads come."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def oriented_jpeg(path, orientation: int = 6):
    """A 16 x 8 photo stored landscape, left half black and right half white, tagged as a phone tags a
    portrait shot (6: the viewer turns it 90 degrees clockwise, so the black half ends up on top)."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:, 8:] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def make_folder(root, per_class=12):
    """Two colour classes (learnable), train and val splits."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 4)):
        for label, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                path = root / split / f"class{label}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    return root


@pytest.fixture
def setup(tmp_path):
    """A two-class colour folder and a small random vit_mini_patch4_32 (TINY_MINI) saved as its weights."""
    import timm
    from safetensors.torch import save_file

    import ivpt.backbones  # noqa: F401  (registers vit_mini_patch4_32 with timm)

    folder = make_folder(tmp_path / "data")
    torch.manual_seed(0)
    backbone = timm.create_model("vit_mini_patch4_32", **TINY_MINI)
    save_file(backbone.state_dict(), str(tmp_path / "backbone.safetensors"))
    return tmp_path, folder


def config(tmp_path, folder, **changes):
    """A validated TrainConfig of a short iVPT run on ``setup``'s folder and backbone."""
    from ivpt.engine.config import TrainConfig

    base = dict(backbone="vit_mini_patch4_32", backbone_options=TINY_MINI, weights=str(tmp_path / "backbone.safetensors"),
                method="ivpt", method_options={"prompt_length": 3, "ar_gamma_init": 0.1, "prompt_dropout": 0.1},
                data={"kind": "folder", "root": str(folder)}, epochs=3, warmup_epochs=1, batch_size=8, lr=2.0,
                output=str(tmp_path / "run"))
    base.update(changes)
    return TrainConfig(**base).validate()


def adapter_tensors(run):
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter.safetensors"))


def ddp_worker(rank, world, port, cfg_dict, result_path):
    """One rank of a DDP training (torch.multiprocessing's entry point), as torchrun would start it."""
    import json
    from pathlib import Path

    from ivpt.engine.config import TrainConfig
    from ivpt.engine.loop import train

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    os.environ.pop("OMP_NUM_THREADS", None)  # as under torchrun without it: ivpt divides the cores itself
    results = train(TrainConfig(**cfg_dict), quiet=True)
    Path(f"{result_path}.rank{rank}").write_text(json.dumps({"threads": results["threads"],
                                                             "inside": torch.get_num_threads()}))
    if rank == 0:
        Path(result_path).write_text(json.dumps({"val": results["val"]["top1"], "log": results["log"]}))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cifar_tar(tmp_path, monkeypatch):
    """A tiny CIFAR-10 download (two classes, eight images per split and class) and a private cache."""
    monkeypatch.setenv("IVPT_CACHE", str(tmp_path / "cache"))
    files = {f"cifar10/{split}/{cls}/{i:04d}.jpg": image_bytes(20 * i + 60 * c, (32, 32), "JPEG")
             for split in ("train", "test") for c, cls in enumerate(("cat", "dog")) for i in range(8)}
    write_tar(tmp_path / "c.tar.gz", files)
    return tmp_path / "c.tar.gz"


def pretrain_args(tar, out):
    """ivpt pretrain's arguments for a three-epoch run of a tiny backbone on ``cifar_tar``."""
    return ["--data", str(tar), "--out", str(out), "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "4",
            "--width", "32", "--depth", "2", "--heads", "2", "--precision", "fp32", "--threads", "1"]


def copy_tuned(src, dst):
    """Give dst the same prompts and head as src (the parts both methods have)."""
    with torch.no_grad():
        dst.head.weight.copy_(src.head.weight)
        dst.head.bias.copy_(src.head.bias)
        dst.method.prompts.copy_(src.method.prompts)


def rewrite_config(directory, change):
    """Damage the config where the loader reads it: inside adapter.safetensors (format 2)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = directory / "adapter.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    if callable(change):
        config = json.loads(metadata["ivpt_adapter_config"])
        change(config)
        metadata["ivpt_adapter_config"] = json.dumps(config)
    else:
        metadata["ivpt_adapter_config"] = change
    save_file(tensors, str(path), metadata=metadata)


def full_attention_saliency(block, tokens, query_rows, key_start):
    """The saliency from the explicit T x T attention matrix, computed independently of ivpt."""
    attn = block.attn
    b, t, d = tokens.shape
    qkv = attn.qkv(block.norm1(tokens)).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)  # (B, H, T, T)
    return weights[:, :, query_rows].mean(dim=(1, 2))[:, key_start:]


def record_ar(model):
    """Wrap the method's reinforce to see patch tokens before and after each AR step."""
    seen = []
    original = model.method.reinforce

    def spy(i, patches, saliency, prompts):
        out, selected = original(i, patches, saliency, prompts)
        seen.append((i, patches.detach(), out.detach(), saliency, selected))
        return out, selected

    model.method.reinforce = spy
    return seen


def record_block_inputs(model):
    """Each block's input tokens (norm1's input: AR's blocks run their modules, not ``block(x)``)."""
    inputs = {}
    for i, block in enumerate(model.backbone.blocks):
        block.norm1.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
    return inputs


def lay_out_hub_repo(cache, repo: str, files: dict[str, bytes], revision: str, refs: list[str],
                     repo_type: str = "model") -> str:
    """huggingface_hub's cache format: blobs named by content hash, snapshots/<commit>/ links, refs/<name>
    (``revision``: the text the commit hash is made from)."""
    import hashlib

    root = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    commit = hashlib.sha1(revision.encode()).hexdigest()
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return commit


def run_offline(cache, code: str) -> dict:
    """Run ``code`` in a fresh Python with the hub cache at ``cache`` and no network; its last line as JSON."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_printed_call(said: str):
    """The model that the line export printed builds (``load it with: ...``), run as a user would paste it."""
    line = next(line for line in said.splitlines() if line.startswith("load it with: "))
    code = line.removeprefix("load it with: ")
    assert "import ivpt" not in code  # run in an empty scope below: it could use no ivpt code unimported
    scope = {}
    exec(code, scope)
    return scope["model"]


def load_script(relative: str):
    """A script of the repository (``benchmarks/cost.py``, ``tools/pause.py``) as a module, able to import its
    siblings (benchmarks/common.py) as it does when run."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relative
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str):
    return load_script(f"benchmarks/{name}.py")


def tuning_recipe(folder):
    """The tuning tests' recipe (test_tune, test_e2vpt): VPT-deep on clevr-dist, a tiny random backbone saved
    into ``folder``. clevr-dist renders once into the session's test cache (conftest's $IVPT_CACHE), which every test here
    and every worker process it starts reads."""
    import timm
    from safetensors.torch import save_file

    from ivpt.engine.config import TrainConfig

    torch.manual_seed(0)
    save_file(timm.create_model("vit_mini_patch4_32", **TINY_MINI).state_dict(), str(folder / "b.safetensors"))
    return TrainConfig(backbone="vit_mini_patch4_32", backbone_options=TINY_MINI, weights=str(folder / "b.safetensors"),
                       method="vpt-deep", method_options={"prompt_length": 1},
                       data={"kind": "suite", "task": "clevr-dist"}, epochs=2, warmup_epochs=0, batch_size=200,
                       optimizer="adamw", lr_scaling=False,
                       protocol={"lrs": [0.3, 0.03, 0.003, 0.0003], "wds": [0.0], "seeds": [1, 2]},
                       output=str(folder / "tune")).validate()
