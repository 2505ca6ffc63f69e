"""E2VPT (issue 34): key-value prompts inside every block's attention beside VPT-deep's input prompts, and the
pruning of prompt tokens and pieces with rewinding, as the official code (ChengHan111/E2VPT) runs them."""
import dataclasses
import json
import math

import pytest
import torch

import ivpt
from conftest import clone, make_vit, randomize
from ivpt.engine import pruning

PIECES4 = {"mask_pieces": 4}  # the test ViT is 32 wide: four pieces of eight strided dims


def reference_e2vpt(vit, prompts, keys, values, images):
    """E2VPT written from the paper's definition: VPT-deep whose attention in block i attends to [K_i | x W_k]
    with values [V_i | x W_v] (the key-value prompts before the tokens' own, as the code's LAYER_BEHIND),
    scores / sqrt(d_h); the class token's final state through the final norm to the head."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    b, p, heads = x.shape[0], prompts.shape[1], vit.blocks[0].attn.num_heads
    for i, block in enumerate(vit.blocks):
        x = torch.cat([x[:, :1], prompts[i].expand(b, -1, -1), x[:, 1 + (p if i else 0):]], dim=1)
        t, d = x.shape[1], x.shape[2]
        h = block.norm1(x)
        q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        k = torch.cat([keys[i].expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([values[i].expand(b, -1, -1, -1), v], dim=2)
        attention = (q @ k.transpose(-2, -1) / math.sqrt(d // heads)).softmax(dim=-1)
        x = x + block.attn.proj((attention @ v).transpose(1, 2).reshape(b, t, d))
        x = x + block.mlp(block.norm2(x))
    return vit.head(vit.norm(x)[:, 0])


@pytest.mark.parametrize("shared", [True, False])
def test_e2vpt_matches_an_independent_forward(shared, images):
    model = randomize(ivpt.create_model(make_vit(), "e2vpt", 7, prompt_length=3, kv_length=2, kv_shared=shared)).eval()
    method = model.method
    keys = method.kv_prompts if shared else method.key_prompts
    values = method.kv_prompts if shared else method.value_prompts
    with torch.no_grad():
        expected = reference_e2vpt(model.backbone, method.prompts, keys, values, images)
        assert torch.allclose(model(images), expected, atol=1e-5)
        if not shared:  # the values matter on their own
            method.value_prompts.add_(1.0)
            assert not torch.allclose(model(images), expected, atol=1e-3)


def test_e2vpt_without_key_value_prompts_is_vpt_deep_exactly(images):
    vit = make_vit()
    e2vpt = randomize(ivpt.create_model(clone(vit), "e2vpt", 7, prompt_length=4, kv_length=0)).eval()
    deep = ivpt.create_model(clone(vit), "vpt-deep", 7, prompt_length=4).eval()
    assert set(e2vpt.state_dict()) == set(deep.state_dict())  # no tensor beside VPT-deep's
    deep.load_state_dict(e2vpt.state_dict())
    with torch.no_grad():
        assert torch.equal(e2vpt(images), deep(images))
    e2vpt.train(), deep.train()
    e2vpt(images).sum().backward(), deep(images).sum().backward()
    assert torch.equal(e2vpt.method.prompts.grad, deep.method.prompts.grad)


def test_key_value_prompts_are_initialised_as_the_code_does():
    model = ivpt.create_model(make_vit(), "e2vpt", 7, prompt_length=2, kv_length=50)
    kv = model.method.kv_prompts  # (N, H, n, d_h) = (4, 4, 50, 8): kaiming_uniform bound sqrt(6 / (n * d_h))
    bound = math.sqrt(6 / (50 * 8))
    assert kv.shape == (4, 4, 50, 8) and kv.abs().max() <= bound and kv.abs().max() > 0.9 * bound
    uniform = ivpt.create_model(make_vit(), "e2vpt", 7, kv_length=50, kv_init="uniform").method.kv_prompts
    assert uniform.abs().max() <= math.sqrt(6 / (3 * 8 * 8 + 16)) and uniform.abs().max() > 0.09
    normal = ivpt.create_model(make_vit(), "e2vpt", 7, kv_length=50, kv_init="trunc_normal").method.kv_prompts
    assert normal.std().item() == pytest.approx(0.02, rel=0.15)
    split = ivpt.create_model(make_vit(), "e2vpt", 7, kv_length=3, kv_shared=False).method
    assert split.kv_prompts is None and not torch.equal(split.key_prompts, split.value_prompts)


def test_key_value_dropout_acts_in_training_only(images):
    model = ivpt.create_model(make_vit(), "e2vpt", 7, kv_length=3, kv_dropout=0.5).eval()
    keys, values = model.method.key_value_prompts(0, 2)
    assert torch.equal(keys, values)  # eval: the shared tensor as it is
    model.train()
    torch.manual_seed(0)
    keys, values = model.method.key_value_prompts(0, 2)
    assert (keys == 0).any() and not torch.equal(keys, values)  # drawn apart, as the code's two dropout calls


# -- the masks ------------------------------------------------------------------------------------------
def masked_copy(model, pruned_tokens, pruned_pieces):
    """The unpruned ``prune: true`` model with its scales set to the binary masks (the code's mask_soft_tokens)."""
    with torch.no_grad():
        model.method.token_scales.fill_(1.0)[list(pruned_tokens)] = 0.0
        model.method.piece_scales.fill_(1.0)
        for token, pieces in enumerate(pruned_pieces):
            model.method.piece_scales[token, list(pieces)] = 0.0
    return model


def test_learned_scales_at_one_change_nothing(images):
    vit = make_vit()
    plain = randomize(ivpt.create_model(clone(vit), "e2vpt", 7, prompt_length=3, kv_length=2, **PIECES4)).eval()
    scaled = ivpt.create_model(clone(vit), "e2vpt", 7, prompt_length=3, kv_length=2, prune=True, **PIECES4).eval()
    scaled.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(scaled.method.parameter_groups()) == ["kv_prompts", "masks", "prompts"]
    with torch.no_grad():
        assert torch.equal(scaled(images), plain(images))


def test_a_pruned_model_equals_the_unpruned_one_with_the_pruned_prompts_masked(images):
    vit = make_vit()
    pruned_tokens, pruned_pieces = [1], [[0, 3], [], [2], []]
    torch.manual_seed(5)
    unpruned = ivpt.create_model(clone(vit), "e2vpt", 7, prompt_length=4, kv_length=2, prune=True, **PIECES4)
    torch.manual_seed(5)
    pruned = ivpt.create_model(clone(vit), "e2vpt", 7, prompt_length=4, kv_length=2, pruned_tokens=pruned_tokens,
                               pruned_pieces=pruned_pieces, **PIECES4)
    # the same draws: the surviving values are the unpruned model's at the surviving places
    full = unpruned.method.prompts.detach()
    keep = torch.ones(4, 32, dtype=torch.bool)
    keep[1] = False
    dims = torch.arange(32)
    keep[0] &= (dims % 4 != 0) & (dims % 4 != 3)  # piece j holds dims c with c % 4 == j (strided, as the code)
    keep[2] &= dims % 4 != 2
    assert torch.equal(pruned.method.prompt_values, full.reshape(4, -1)[:, keep.flatten()])
    assert pruned.method.prompt_values.shape == (4, 128 - 32 - 16 - 8)
    masked_copy(unpruned, pruned_tokens, pruned_pieces).eval(), pruned.eval()
    with torch.no_grad():
        assert torch.allclose(pruned(images), unpruned(images), atol=1e-6)
        # a pruned token still takes its place in the sequence (the code multiplies it by zero, it does not drop it)
        assert pruned.forward_tokens(images).prompts.shape[1] == 4
        assert torch.equal(pruned.method.block_prompts(2)[1], torch.zeros(32))
    # and trains only what survives
    pruned.train()
    pruned(images).sum().backward()
    assert pruned.method.prompt_values.grad.abs().min() > 0


def test_a_pruned_adapter_stores_only_the_surviving_values(tmp_path, images):
    vit = make_vit()
    model = randomize(ivpt.create_model(clone(vit), "e2vpt", 7, prompt_length=4, kv_length=2, pruned_tokens=[0, 2],
                                        pruned_pieces=[[1], [1], [1], [0, 1, 2]], **PIECES4)).eval()
    model.save_adapter(tmp_path / "a")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    surviving = 32 - 8 + 32 - 24  # tokens 1 and 3: one and three pieces of eight dims gone
    assert stored["method.prompt_values"].shape == (4, surviving) and "method.prompts" not in stored
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["options"]["pruned_tokens"] == [0, 2] and config["options"]["pruned_pieces"][3] == [0, 1, 2]
    loaded = ivpt.load_adapter(tmp_path / "a", backbone=clone(vit)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def params_row(capsys, options) -> dict[str, str]:
    from ivpt.cli import main

    assert main(["params", "--backbone", "vit_base_patch16_224", "--method", "e2vpt", "--prompt-length", "5",
                 "--options", json.dumps(options), "--num-classes", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    return dict(zip(lines[header].split(), lines[header + 1].split()))


def test_vit_b16_parameter_counts_from_ivpt_params(capsys):
    # input prompts N p d = 12 * 5 * 768; key-value prompts N H n d_h = 12 * 12 * 5 * 64, once when shared
    row = params_row(capsys, {"kv_length": 5})
    assert (row["prompts"], row["kv_prompts"], row["head"]) == ("46080", "46080", "76900")
    assert row["tuned"] == str(46080 * 2 + 76900)
    assert params_row(capsys, {"kv_length": 5, "kv_shared": False})["kv_prompts"] == "92160"
    # pruned: three tokens kept, each with 8 of its 16 pieces of 48 dims: 12 * 3 * 384
    pruned = params_row(capsys, {"kv_length": 5, "pruned_tokens": [0, 1], "pruned_pieces": [list(range(8))] * 5})
    assert pruned["prompts"] == str(12 * 3 * 384) == "13824"
    # the learned scales of the first stage: p + p * 16
    assert params_row(capsys, {"kv_length": 5, "prune": True})["masks"] == str(5 + 5 * 16)


def test_e2vpt_options_are_checked():
    cases = [({"pruned_tokens": [5]}, r"'pruned_tokens': got 5, expected an integer in \[0, 4\]"),
             ({"pruned_tokens": [0, 1, 2, 3, 4]}, "all 5 prompt tokens pruned"),
             ({"pruned_pieces": [[1]]}, "one list of pruned piece indices per prompt token"),
             ({"pruned_pieces": [[16], [], [], [], []]}, r"pruned_pieces\[0\]': got 16"),
             ({"prune": True, "pruned_tokens": [1]}, "already pruned"),
             ({"pruned_tokens": [1, 1]}, "listed twice"),
             ({"kv_init": "xavier"}, "'kv_init': got 'xavier'"),
             ({"kv_length": -1}, "'kv_length'"),
             ({"mask_pieces": 5}, "'mask_pieces': 5 does not divide the backbone's width 32")]
    for options, message in cases:
        with pytest.raises(ivpt.OptionError, match=message):
            ivpt.create_model(make_vit(), "e2vpt", 7, **options)


# -- the pruning stage ----------------------------------------------------------------------------------
def test_mask_levels_are_the_codes():
    # determine_mask_sequence with the code's defaults: 5 tokens (MIN 1), 16 pieces (MIN 4)
    assert pruning.mask_counts(5, minimum=pruning.MIN_TOKENS) == [0, 1, 2, 3, 4]
    assert pruning.mask_counts(16, minimum=pruning.MIN_PIECES) == [1, 3, 4, 6, 8, 9, 11, 12]
    assert pruning.mask_counts(10, minimum=1) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert pruning.mask_counts(2, minimum=1) == [0, 1]
    # the lowest scores first, signed (the code sorts the raw mean gradient, ascending); ties by index
    assert pruning.lowest([0.3, -0.2, 0.3, -0.5], 2) == [1, 3]
    assert pruning.lowest([0.1, 0.1, 0.1], 2) == [0, 1]
    assert pruning.masks_at([1.0, -1.0], [[3, 2, 1, 0], [0, 1, 2, 3]], 1, 2) == {
        "pruned_tokens": [1], "pruned_pieces": [[2, 3], [0, 1]]}
    # the best val; ties: more tokens pruned, then more pieces
    assert pruning.choose_rewind({(1, 0): 0.5, (1, 1): 0.5, (2, 0): 0.4}) == (1, 1)
    assert pruning.choose_rewind({(1, 1): 0.5, (3, 1): 0.5, (2, 0): 0.6}) == (2, 0)


@pytest.fixture
def e2vpt_recipe(recipe):
    return dataclasses.replace(
        recipe, method="e2vpt", method_options={"prompt_length": 2, "kv_length": 2, "prune": True, "mask_pieces": 8},
        protocol={"lrs": [0.3, 0.03], "wds": [0.0], "seeds": [1], "prune_percents": [10, 50]}).validate()


@pytest.fixture
def recipe(tmp_path):
    from conftest import tuning_recipe

    return tuning_recipe(tmp_path)


def test_tune_prunes_rewinds_and_trains_the_seeds_at_the_best_level(e2vpt_recipe, tmp_path):
    from ivpt.engine.config import ConfigError, TrainConfig
    from ivpt.engine.study import tune

    out = tmp_path / "tune"
    summary = tune(e2vpt_recipe, out, pruner="none")
    record = summary["pruning"]
    # the scores are the chosen grid run's, recomputed here from its adapter
    chosen_run = out / "grid" / f"lr{summary['chosen']['lr']:g}_wd0"
    assert record["scored"] == str(chosen_run / "adapter")
    grid_cfg = TrainConfig(**json.loads((chosen_run / "results.json").read_text())["config"])
    tokens, pieces = pruning.importance(grid_cfg, chosen_run / "adapter")
    assert torch.allclose(torch.tensor(tokens), torch.tensor(record["token_scores"]), rtol=1e-5, atol=1e-12)
    assert torch.allclose(torch.tensor(pieces), torch.tensor(record["piece_scores"]), rtol=1e-5, atol=1e-12)
    assert any(abs(v) > 0 for row in pieces for v in row)
    # every level rewound (2 tokens: levels 0 and 1; 8 pieces with 4 kept: 0 and 4; the level that prunes
    # nothing is a rewind too), each with its masks
    assert sorted((r["tokens"], r["pieces"]) for r in record["rewinds"]) == [(0, 0), (0, 4), (1, 0), (1, 4)]
    rewinds = out / "rewind" / f"lr{summary['chosen']['lr']:g}_wd0"
    for r in record["rewinds"]:
        done = json.loads((rewinds / f"tokens{r['tokens']}_pieces{r['pieces']}" / "results.json").read_text())
        masks = pruning.masks_at(record["token_scores"], record["piece_scores"], r["tokens"], r["pieces"])
        assert {k: done["config"]["method_options"][k] for k in masks} == masks
        assert done["config"]["lr"] == summary["chosen"]["lr"] and done["val"]["top1"] == r["val_top1"]
    best = max(record["rewinds"], key=lambda r: (round(r["val_top1"], 6), r["tokens"], r["pieces"]))
    assert (record["chosen"]["tokens"], record["chosen"]["pieces"]) == (best["tokens"], best["pieces"])
    # the seeds train the chosen masks; the parameters counted are the survivors'
    final = json.loads((out / "final" / "seed1" / "results.json").read_text())
    assert final["config"]["method_options"]["pruned_pieces"] == record["chosen"]["pruned_pieces"]
    from ivpt.methods.e2vpt import E2VPTConfig, survivors

    chosen = E2VPTConfig(prompt_length=2, mask_pieces=8, pruned_tokens=record["chosen"]["pruned_tokens"],
                         pruned_pieces=record["chosen"]["pruned_pieces"])
    assert summary["parameters"]["prompts"] == 2 * int(survivors(chosen, 32).sum()) < 2 * 2 * 32  # two blocks
    # a second tune trains nothing and gives the same summary
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    assert tune(e2vpt_recipe, out, pruner="none") == summary
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == stamps
    # the scores of another run are refused, never reused
    scores = out / "pruning" / f"lr{summary['chosen']['lr']:g}_wd0" / "importance.json"
    scores.write_text(json.dumps({**json.loads(scores.read_text()), "scored": "elsewhere/adapter"}))
    with pytest.raises(ConfigError, match="holds the scores of elsewhere/adapter, not of the chosen run"):
        tune(e2vpt_recipe, out, pruner="none")
    # seeds finished with other masks are refused, not reused
    final = out / "final" / "seed1" / "results.json"
    done = json.loads(final.read_text())
    done["config"]["method_options"]["pruned_tokens"] = [0] if not record["chosen"]["pruned_tokens"] else []
    final.write_text(json.dumps(done))
    scores.unlink()  # scored again: the chosen run's own scores
    with pytest.raises(ValueError, match="finished run of another config.*method_options"):
        tune(e2vpt_recipe, out, pruner="none")


def test_scoring_in_micro_batches_gives_the_same_scores(e2vpt_recipe, tmp_path):
    from ivpt.engine.loop import train

    cfg = dataclasses.replace(e2vpt_recipe, output=str(tmp_path / "run"), epochs=1)
    train(cfg, quiet=True)
    whole = pruning.importance(cfg, tmp_path / "run" / "adapter")
    split = pruning.importance(dataclasses.replace(cfg, accumulation=4), tmp_path / "run" / "adapter")
    for a, b in zip(whole, split):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-9)


def test_prune_percents_only_where_pruning_runs(recipe):
    from ivpt.engine.config import ConfigError

    with pytest.raises(ConfigError, match="prune_percents.*e2vpt with method_options.prune"):
        dataclasses.replace(recipe, protocol={**recipe.protocol, "prune_percents": [50]}).validate()
    with pytest.raises(ConfigError, match=r"protocol.prune_levels': unknown"):
        dataclasses.replace(recipe, protocol={**recipe.protocol, "prune_levels": [50]}).validate()


def test_a_single_run_of_a_pruning_recipe_says_it_is_the_first_stage(e2vpt_recipe):
    import warnings

    from ivpt.engine.pruning import warn_single_run

    with pytest.warns(UserWarning, match="first stage only.*ivpt tune"):
        warn_single_run(e2vpt_recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_single_run(dataclasses.replace(e2vpt_recipe, method_options={"prompt_length": 2}, protocol={}))
