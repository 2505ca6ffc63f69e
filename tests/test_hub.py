"""Adapters by Hub name (from a Hub cache laid out here in huggingface_hub's format), cards, push, extras."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ivpt
from ivpt.card import read_card_metadata
from conftest import lay_out_hub_repo, run_offline

BACKBONE = "vit_mini_patch4_32.ivpt_cifar10"


def adapter_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("adapter.safetensors", "adapter_config.json", "README.md")}


def test_adapters_load_by_hub_name_offline_with_revisions(tmp_path):
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    first = ivpt.create_model(BACKBONE, "vpt-deep", 3, prompt_length=2)
    second = ivpt.create_model(BACKBONE, "lora", 3)
    with torch.no_grad():
        for p in second.method.parameters():
            p.add_(0.1)
    first.save_adapter(tmp_path / "a1")
    second.save_adapter(tmp_path / "a2")
    cache = tmp_path / "hub"
    lay_out_hub_repo(cache, "someone/old", adapter_files(tmp_path / "a1"), "r1", ["v1"])
    lay_out_hub_repo(cache, "someone/old", adapter_files(tmp_path / "a2"), "r2", ["main"])
    lay_out_hub_repo(cache, "someone/broken", {"README.md": b"# not an adapter\n"}, "r3", ["main"])
    torch.save(images, tmp_path / "images.pt")
    code = f"""
import json, torch, ivpt
images = torch.load({str(tmp_path / 'images.pt')!r})
out = {{}}
for name in ("hf-hub:someone/old", "hf-hub:someone/old@v1"):
    m = ivpt.load_adapter(name).eval()
    with torch.no_grad():
        out[name] = [m.method_name, m(images).tolist()]
for name in ("hf-hub:someone/missing", "hf-hub:someone/broken", "hf-hub:someone/old@v9", "hf-hub:nobody"):
    try:
        ivpt.load_adapter(name)
        out[name] = "loaded"
    except ValueError as err:
        out[name] = str(err)
print(json.dumps(out))
"""
    result = run_offline(cache, code)
    for name, model in (("hf-hub:someone/old", second), ("hf-hub:someone/old@v1", first)):
        with torch.no_grad():
            expected = model.eval()(images)
        assert result[name][0] == model.method_name
        assert torch.allclose(torch.tensor(result[name][1]), expected, atol=1e-6)
    assert "someone/missing" in result["hf-hub:someone/missing"] and "HF_HUB_OFFLINE" in result["hf-hub:someone/missing"]
    assert "has no adapter.safetensors" in result["hf-hub:someone/broken"]
    assert "someone/old" in result["hf-hub:someone/old@v9"] and "v9" in result["hf-hub:someone/old@v9"]
    assert "hf-hub:ORG/NAME" in result["hf-hub:nobody"]


def test_cli_reads_hub_names_too(tmp_path):
    ivpt.create_model(BACKBONE, "linear", 3).save_adapter(tmp_path / "a")
    cache = tmp_path / "hub"
    commit = lay_out_hub_repo(cache, "someone/lin", adapter_files(tmp_path / "a"), "r1", ["main"])
    from PIL import Image
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "red.png")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "ivpt.cli", "predict", "hf-hub:someone/lin", str(tmp_path / "red.png"),
                          "--output", str(tmp_path / "p.json")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-1000:]
    written = json.loads((tmp_path / "p.json").read_text())
    assert written["predictions"] and written["adapter"] == "hf-hub:someone/lin"
    assert written["adapter_revision"] == f"hf-hub:someone/lin@{commit}"  # main moves; the commit read stays


def test_card_numbers_equal_results_and_follow_each_save(tmp_path):
    import numpy as np
    from PIL import Image

    from ivpt.engine.config import load_config
    from ivpt.engine.loop import train

    # a small folder (a suite task would train 800 images): val balanced and test not, so that their scores
    # differ even where the run answers one class
    rng = np.random.default_rng(0)
    for split, counts in (("train", (12, 12)), ("val", (4, 4)), ("test", (6, 2))):
        for label, count in enumerate(counts):
            for i in range(count):
                path = tmp_path / "photos" / split / f"class{label}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    fields = dict(backbone=BACKBONE, method="vpt-deep", method_options={"prompt_length": 2},
                  data={"kind": "folder", "root": str(tmp_path / "photos")}, epochs=1, warmup_epochs=0, batch_size=64,
                  lr=0.01, optimizer="adamw", lr_scaling=False, precision="fp32", test_split="test",
                  output=str(tmp_path / "run"))
    results = train(load_config(None, fields=fields), quiet=True)
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    meta = read_card_metadata(card)
    assert meta["library_name"] == "ivpt" and "vpt-deep" in meta["tags"]
    values = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values == {"val top-1": results["val"]["top1"], "test top-1": results["test"]["top1"]}
    assert results["val"]["top1"] != results["test"]["top1"]  # so a card that swapped them would fail
    assert "| prompts | 2,304 |" in card  # 6 blocks x 2 prompts x 192, counted from the tensor shapes
    assert "epochs: 1" in card and BACKBONE in card
    model = ivpt.load_adapter(tmp_path / "run" / "adapter")
    model.save_adapter(tmp_path / "run" / "adapter", metrics={"val": 0.5})  # a second save: the card follows
    again = read_card_metadata((tmp_path / "run" / "adapter" / "README.md").read_text())
    assert [m["value"] for m in again["model-index"][0]["results"][0]["metrics"]] == [0.5]
    assert not [p for p in (tmp_path / "run" / "adapter").iterdir() if ".tmp" in p.name]


def test_push_dry_run_writes_the_exact_upload(tmp_path):
    from ivpt.cli import main

    model = ivpt.create_model(BACKBONE, "lora", 3)
    model.save_adapter(tmp_path / "run" / "adapter", metrics={"val": 0.25})
    summary = {"chosen": {"lr": 0.01, "weight_decay": 0.0}, "seeds": [42, 44], "test_top1": [0.3, 0.35],
               "test_mean": 0.325, "test_std": 0.035}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    assert main(["push", str(tmp_path / "run"), "someone/lora-test", "--dry-run", str(tmp_path / "upload")]) == 0
    assert sorted(p.name for p in (tmp_path / "upload").iterdir()) == ["README.md", "adapter.safetensors",
                                                                        "adapter_config.json"]
    card = (tmp_path / "upload" / "README.md").read_text()
    assert "42: 0.3000, 44: 0.3500" in card and "test mean over 2 seeds" in card
    assert ivpt.load_adapter(tmp_path / "upload").method_name == "lora"
    tune_folder = tmp_path / "tune"  # an ivpt tune folder: the first seed's adapter, every seed in the card
    model.save_adapter(tune_folder / "final" / "seed42" / "adapter")
    (tune_folder / "summary.json").write_text(json.dumps(summary))
    assert main(["push", str(tune_folder), "someone/t", "--dry-run", str(tmp_path / "up3")]) == 0
    assert "42: 0.3000, 44: 0.3500" in (tmp_path / "up3" / "README.md").read_text()
    assert model.push_to_hub("someone/x", dry_run=tmp_path / "up2") == str(tmp_path / "up2")
    assert (tmp_path / "up2" / "README.md").is_file()


def test_push_without_network_says_how(tmp_path):
    ivpt.create_model(BACKBONE, "linear", 3).save_adapter(tmp_path / "a")
    code = f"""
import json, ivpt
from ivpt.hub import push_to_hub
try:
    push_to_hub({str(tmp_path / 'a')!r}, "someone/x")
    print(json.dumps("pushed"))
except ValueError as err:
    print(json.dumps(str(err)))
"""
    message = run_offline(tmp_path / "hub", code)
    assert "someone/x" in message and "HF_HUB_OFFLINE" in message and "--dry-run" in message


class FakeHub:
    """Stands in for huggingface_hub.HfApi: repositories as {repo_id: private}, new ones created with the
    organisation's default unless ``private`` is sent (as the Hub does), every upload's files kept."""

    def __init__(self, repos=None, default_private=False):
        self.repos, self.default_private = dict(repos or {}), default_private
        self.created, self.uploads, self.commits = [], [], []

    def __call__(self, token=None):  # HfApi(token=...)
        return self

    def create_repo(self, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))
        if repo_id not in self.repos:
            private = kwargs.get("private")
            self.repos[repo_id] = self.default_private if private is None else private
        return f"https://huggingface.co/{repo_id}"

    def repo_info(self, repo_id, **kwargs):
        return SimpleNamespace(private=self.repos[repo_id])

    def upload_folder(self, folder_path, repo_id, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.uploads.append((repo_id, files))
        self.commits.append(hashlib.sha1(f"commit {len(self.uploads)}".encode()).hexdigest())
        return SimpleNamespace(oid=self.commits[-1], commit_url=f"https://huggingface.co/{repo_id}/commit/...")


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    def install(**kwargs):
        fake = FakeHub(**kwargs)
        monkeypatch.setattr(huggingface_hub, "HfApi", fake)
        monkeypatch.setattr("ivpt.reach.hub_unreachable", lambda: None)  # the fake Hub answers
        return fake
    return install


def test_push_leaves_a_new_repos_visibility_to_the_hub_and_names_the_commit(tmp_path, fake_hub, capsys):
    from ivpt.cli import main
    from ivpt.hub import parse_hub_name, push_to_hub

    ivpt.create_model(BACKBONE, "linear", 3).save_adapter(tmp_path / "a")
    hub = fake_hub(default_private=True)  # an organisation whose new repositories are private
    pinned = push_to_hub(tmp_path / "a", "org/new")
    assert hub.repos["org/new"] is True and "private" not in hub.created[0][1]
    oid = hub.commits[0]
    assert pinned == f"hf-hub:org/new@{oid}" and parse_hub_name(pinned) == ("org/new", oid)
    assert main(["push", str(tmp_path / "a"), "org/asked", "--private"]) == 0
    assert hub.repos["org/asked"] is True
    assert f"hf-hub:org/asked@{hub.commits[1]}" in capsys.readouterr().out
    assert main(["push", str(tmp_path / "a"), "org/plain"]) == 0  # the CLI, asked nothing, sends nothing either
    assert hub.repos["org/plain"] is True and "private" not in hub.created[-1][1]
    assert main(["push", str(tmp_path / "a"), "org/shown", "--public"]) == 0
    assert hub.repos["org/shown"] is False
    assert main(["push", str(tmp_path / "a"), "org/new"]) == 0  # an existing private repository, nothing asked
    assert len(hub.uploads) == 5 and hub.repos["org/new"] is True


def test_push_refuses_an_existing_repo_of_the_other_visibility(tmp_path, fake_hub, capsys):
    from ivpt.adapter_format import AdapterError
    from ivpt.cli import main
    from ivpt.hub import push_to_hub

    ivpt.create_model(BACKBONE, "linear", 3).save_adapter(tmp_path / "a")
    hub = fake_hub(repos={"org/open": False, "org/closed": True})
    with pytest.raises(AdapterError, match=r"org/open.*is public.*private repository was asked"):
        push_to_hub(tmp_path / "a", "org/open", private=True)
    with pytest.raises(AdapterError, match=r"org/closed.*is private.*public repository was asked"):
        push_to_hub(tmp_path / "a", "org/closed", private=False)
    assert main(["push", str(tmp_path / "a"), "org/open", "--private"]) == 2  # a ValueError: exit 2
    assert "org/open" in capsys.readouterr().err
    assert hub.uploads == [] and hub.repos == {"org/open": False, "org/closed": True}
    push_to_hub(tmp_path / "a", "org/closed", private=True)  # as asked: uploaded
    push_to_hub(tmp_path / "a", "org/open")  # nothing asked: the repository stays as it is
    assert [repo for repo, _ in hub.uploads] == ["org/closed", "org/open"]
    assert hub.repos == {"org/open": False, "org/closed": True}


def test_push_uploads_the_config_the_loader_uses_not_a_stale_json_copy(tmp_path, fake_hub):
    import warnings

    from ivpt.hub import push_to_hub

    old = ivpt.create_model(BACKBONE, "lora", 3)
    new = ivpt.create_model(BACKBONE, "lora", 3)
    with torch.no_grad():
        for p in new.method.parameters():
            p.add_(0.1)
    folder = tmp_path / "a"
    old.save_adapter(folder, metrics={"val": 0.25})
    stale = (folder / "adapter_config.json").read_bytes()
    new.save_adapter(folder, metrics={"val": 0.5})
    fresh = (folder / "adapter_config.json").read_bytes()
    tensors = (folder / "adapter.safetensors").read_bytes()
    (folder / "adapter_config.json").write_bytes(stale)  # a kill between the tensor file and its JSON copy
    assert stale != fresh
    hub = fake_hub()
    with pytest.warns(UserWarning, match="differs from the config inside"):
        push_to_hub(folder, "org/x")
    with pytest.warns(UserWarning, match="differs from the config inside"):
        push_to_hub(folder, "org/x", dry_run=tmp_path / "upload")
    uploaded = hub.uploads[0][1]
    assert uploaded["adapter_config.json"] == fresh and uploaded["adapter.safetensors"] == tensors
    assert (tmp_path / "upload" / "adapter_config.json").read_bytes() == fresh
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the staged folder is consistent: no stale-copy warning
        model = ivpt.load_adapter(tmp_path / "upload")
    assert json.loads(fresh)["metrics"] == {"val": 0.5} and model.method_name == "lora"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), new.eval()(x))


def test_push_dry_run_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    from ivpt.adapter_format import AdapterError
    from ivpt.cli import main
    from ivpt.hub import push_to_hub

    ivpt.create_model(BACKBONE, "linear", 3).save_adapter(tmp_path / "a")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert main(["push", str(tmp_path / "a"), "org/x", "--dry-run", str(busy)]) == 2
    assert str(busy) in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"] and (busy / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("a file")
    with pytest.raises(AdapterError, match=str(tmp_path / "file")):
        push_to_hub(tmp_path / "a", "org/x", dry_run=tmp_path / "file")
    assert (tmp_path / "file").read_text() == "a file"
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert push_to_hub(tmp_path / "a", "org/x", dry_run=tmp_path / "empty") == str(tmp_path / "empty")
    assert (tmp_path / "empty" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("module,extra", [("huggingface_hub", "hub"), ("matplotlib", "explain")])
def test_a_missing_extra_is_named(monkeypatch, module, extra):
    from ivpt.extras import require

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=rf"pip install 'ivpt\[{extra}\]'"):
        require(module)


def test_hub_loading_names_the_extra_when_huggingface_hub_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"ivpt\[hub\]"):
        ivpt.load_adapter("hf-hub:someone/x")


def test_backbones_by_hub_name_train_and_reload_offline(tmp_path):
    """A timm backbone named hf-hub:org/name (timm's own Hub loading), from a laid-out cache: the adapter
    records the name, and loading it rebuilds the same backbone from the same cache."""
    import timm
    from safetensors.torch import save

    torch.manual_seed(0)
    kwargs = {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 8}
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs)
    config = {"architecture": "vit_tiny_patch16_224", "num_classes": 10, "model_args": kwargs,
              "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                 "num_classes": 10, "interpolation": "bicubic", "crop_pct": 1.0,
                                 "classifier": "head", "first_conv": "patch_embed.proj"}}
    files = {"config.json": json.dumps(config).encode(),
             "model.safetensors": save({k: v.contiguous() for k, v in vit.state_dict().items()})}
    cache = tmp_path / "hub"
    lay_out_hub_repo(cache, "someone/tiny-vit", files, "r1", ["main"])
    code = f"""
import json, torch, ivpt
model = ivpt.create_model("hf-hub:someone/tiny-vit", "lora", 3, pretrained=True)
with torch.no_grad():
    for p in model.method.parameters():
        p.add_(0.05)
model.save_adapter({str(tmp_path / 'a')!r})
again = ivpt.load_adapter({str(tmp_path / 'a')!r})
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    same = torch.equal(model.eval()(x), again.eval()(x))
print(json.dumps({{"same": same, "name": again.backbone_name,
                   "source": json.load(open({str(tmp_path / 'a' / 'adapter_config.json')!r}))["backbone"]["weights_source"]}}))
"""
    result = run_offline(cache, code)
    assert result == {"same": True, "name": "hf-hub:someone/tiny-vit", "source": "pretrained"}


def test_a_push_says_which_local_paths_go_up_with_the_adapter(tmp_path, fake_hub):
    """Adapters record the backbone weights' file (and runs their data root and command line) to reload on
    this machine; pushed, those paths are public with a public repository: the push names them."""
    import timm
    from safetensors.torch import save_file

    import ivpt.backbones  # noqa: F401  (registers the shipped architecture with timm)
    from ivpt.hub import push_to_hub

    save_file(timm.create_model("vit_mini_patch4_32").state_dict(), str(tmp_path / "mine.safetensors"))
    ivpt.create_model("vit_mini_patch4_32", "linear", 3, weights=tmp_path / "mine.safetensors").save_adapter(
        tmp_path / "a")
    hub = fake_hub()
    with pytest.warns(UserWarning, match=r"record local paths \(backbone\.weights_file\); they are uploaded"):
        push_to_hub(tmp_path / "a", "org/x", dry_run=tmp_path / "up")
    assert str(tmp_path / "mine.safetensors") in (tmp_path / "up" / "adapter_config.json").read_text()
    ivpt.create_model(BACKBONE, "linear", 3).save_adapter(tmp_path / "b")  # the shipped weights: no path
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        push_to_hub(tmp_path / "b", "org/y")
    assert [repo for repo, _ in hub.uploads] == ["org/y"]
