"""torch.compile: every method trains compiled exactly as eager (dynamo capture + AOT autograd).

The matrix uses the ``aot_eager`` backend: it runs dynamo's graph capture and AOTAutograd's joint
graph, which is where hooks, side effects and recompiles go wrong, without inductor's minutes of C++
compilation per graph on 2 cores. Inductor itself runs in benchmarks/compiled.py.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit

import ivpt
from ivpt.methods import METHODS, prompt_options

VARIANTS = [(m, {}) for m in METHODS] + [
    ("ivpt", {"da": "channel"}), ("ivpt", {"da": "sum"}),  # static: the preset ivpt-static above
    ("ivpt", {"ar_source": "prompts"}), ("ivpt", {"ar_mix": "attn"}),
    ("lora", {"lora_targets": ["qkv", "fc2"]}), ("adapter", {"placement": "parallel"}),
    ("vpt-deep", {"prompt_dropout": 0.2}),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batches(sizes=(4, 6)):
    """The third batch has another size: the compiled model must recompile (or go dynamic) and still agree."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 7, (b,), generator=g)) for b in sizes]


def train_steps(model, run, data, autocast=None):
    opt = torch.optim.SGD(list(model.tuned_parameters().values()), lr=0.1, momentum=0.9)
    losses = []
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False):
            loss = F.cross_entropy(run(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def eager_and_compiled(model, data, **kwargs):
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    state = torch.get_rng_state()
    a = train_steps(eager, eager, data, **kwargs)
    torch.set_rng_state(state)
    b = train_steps(compiled, torch.compile(compiled, backend="aot_eager"), data, **kwargs)
    return eager, compiled, a, b


def assert_same(eager, compiled, a, b, tol=1e-5):
    assert a == pytest.approx(b, abs=tol)
    for (name, p), q in zip(eager.tuned_parameters().items(), compiled.tuned_parameters().values()):
        assert torch.allclose(p, q, atol=tol), name


@pytest.mark.parametrize("method,options", VARIANTS, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}"
                                                        for m, o in VARIANTS])
def test_compiled_training_equals_eager(method, options):
    torch.manual_seed(0)
    model = ivpt.create_model(make_vit(depth=2), method, 7, **prompt_options(method, 3), **options).train()
    torch.manual_seed(1)  # the same dropout draws for both (prompt dropout)
    eager, compiled, a, b = eager_and_compiled(model, batches())
    assert_same(eager, compiled, a, b)


def test_compiled_with_gradient_checkpointing_and_bf16_autocast():
    torch.manual_seed(0)
    model = ivpt.create_model(make_vit(depth=3), "ivpt", 7, prompt_length=3, ar_gamma_init=0.1).train()
    model.backbone.set_grad_checkpointing(True)
    eager, compiled, a, b = eager_and_compiled(model, batches((4, 4)))
    assert_same(eager, compiled, a, b)
    eager, compiled, a, b = eager_and_compiled(model, batches((4, 4)), autocast=True)
    assert_same(eager, compiled, a, b, tol=5e-2)  # bf16 rounding differs between fused and unfused ops


def test_compiled_segmentation_model():
    from ivpt.segmentation import create_segmentation_model

    torch.manual_seed(0)
    model = create_segmentation_model(make_vit(depth=2, dynamic_img_size=True), "ivpt", 5, decoder="naive",
                                      crop_size=32, decoder_channels=8, prompt_length=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model, backend="aot_eager")(x), model(x), atol=1e-5)


def test_recipe_compile_field_trains_like_eager(tmp_path):
    from conftest import adapter_tensors, config, make_folder
    from safetensors.torch import save_file

    from ivpt.engine.loop import train

    import timm
    folder = make_folder(tmp_path / "data")
    torch.manual_seed(0)
    save_file(timm.create_model("vit_mini_patch4_32", embed_dim=32, depth=2, num_heads=2).state_dict(),
              str(tmp_path / "backbone.safetensors"))
    common = dict(epochs=2, lr=0.5)
    eager = train(config(tmp_path, folder, output=str(tmp_path / "eager"), **common), quiet=True)
    compiled = train(config(tmp_path, folder, output=str(tmp_path / "compiled"), compile={"backend": "aot_eager"},
                            **common), quiet=True)
    a, b = adapter_tensors(tmp_path / "eager"), adapter_tensors(tmp_path / "compiled")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert eager["val"]["top1"] == compiled["val"]["top1"]
    assert json.loads((tmp_path / "compiled" / "results.json").read_text())["config"]["compile"] == {"backend": "aot_eager"}
    metrics = ivpt.evaluate(tmp_path / "compiled" / "adapter", split="val", compile={"backend": "aot_eager"})
    assert metrics["top1"] == compiled["val"]["top1"]


def test_bad_compile_settings_are_named(tmp_path):
    from ivpt.engine.config import ConfigError, load_config
    from ivpt.engine.loop import compile_model

    with pytest.raises(ConfigError, match="'compile'"):
        load_config(None, fields={"compile": "fastest"})
    with pytest.raises(ConfigError, match="compile.mode"):
        load_config(None, fields={"compile": {"mode": "turbo"}})
    with pytest.raises(ConfigError, match="unknown torch.compile backend 'tpu-magic'"):
        compile_model(torch.nn.Linear(2, 2), {"backend": "tpu-magic"})
    assert load_config(None, fields={"compile": "max-autotune"}).compile == "max-autotune"


def test_ddp_compiled_matches_one_eager_process(tmp_path):
    """DDP (2 gloo ranks) with the recipe's compile field: the same adapter as one eager process."""
    import torch.multiprocessing as mp
    from safetensors.torch import save_file
    from conftest import adapter_tensors, config, ddp_worker, free_port, make_folder

    import timm
    from ivpt.engine.loop import train

    folder = make_folder(tmp_path / "data")
    torch.manual_seed(0)
    save_file(timm.create_model("vit_mini_patch4_32", embed_dim=32, depth=2, num_heads=2).state_dict(),
              str(tmp_path / "backbone.safetensors"))
    common = dict(epochs=2, method_options={"prompt_length": 3, "ar_gamma_init": 0.1}, lr=1.0)
    train(config(tmp_path, folder, output=str(tmp_path / "one"), **common), quiet=True)
    cfg = config(tmp_path, folder, output=str(tmp_path / "two"), compile={"backend": "aot_eager"}, **common)
    mp.start_processes(ddp_worker, args=(2, free_port(), cfg.to_dict(), str(tmp_path / "two.json")),
                       nprocs=2, join=True, start_method="spawn")
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)
