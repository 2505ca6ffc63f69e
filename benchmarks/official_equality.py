"""ivpt's E2VPT, VFPT and GateVPT against their official code: one ViT-B/16's weights and prompts in both,
the same images, the pooled features and the logits compared (docs/benchmarks.md, "Against the official
code").

The official repositories and their dependencies are not ivpt's; put them beside it:

    git clone https://github.com/ChengHan111/E2VPT /path/E2VPT
    git clone https://github.com/runtsang/VFPT /path/VFPT
    git clone https://github.com/ryongithub/GatedPromptTuning /path/GatedPromptTuning
    pip install --target /path/deps --no-deps scipy simplejson termcolor iopath portalocker ml_collections \\
        absl-py contextlib2 fvcore yacs tabulate
    pip install --target /path/timm054 --no-deps timm==0.5.4     # GateVPT's code and the MoCo models need it
    PYTHONPATH=/path/deps python benchmarks/official_equality.py --e2vpt /path/E2VPT --vfpt /path/VFPT \\
        --gatevpt /path/GatedPromptTuning --old-timm /path/timm054

Each configuration builds the official model from the official config (``get_cfg()`` defaults, then the
keys the configuration sets), copies a randomly initialised timm ``vit_base_patch16_224`` and ivpt's
prompts (and key-value prompts, masks, gates, temperatures) into it, and compares in eval mode in float32.
The repositories all name their package ``src``, so each runs in a process of its own. Writes
benchmarks/results/official_equality.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 1e-4  # float32 through 12 blocks computed in another order (separate q/k/v, torch.fft)

# (name, ivpt method options, the official config's keys[, "different" where that is the point]); the official
# keys are those the code reads
E2VPT_CASES = [
    ("shared key-value prompts, p = n = 5 (the default)", {"prompt_length": 5, "kv_length": 5},
     {"NUM_TOKENS_P": 5, "NUM_TOKENS": 5, "MASK_CLS_TOKEN": False}),
    ("key and value prompts apart, p = n = 10", {"prompt_length": 10, "kv_length": 10, "kv_shared": False},
     {"NUM_TOKENS_P": 10, "NUM_TOKENS": 10, "SHARE_PARAM_KV": False, "MASK_CLS_TOKEN": False}),
    ("key-value prompts after the tokens' own (LAYER_BEHIND false)", {"prompt_length": 5, "kv_length": 5},
     {"NUM_TOKENS_P": 5, "NUM_TOKENS": 5, "MASK_CLS_TOKEN": False, "LAYER_BEHIND": False}),
    ("learned token and piece masks, random values", {"prompt_length": 10, "kv_length": 5, "prune": True},
     {"NUM_TOKENS_P": 10, "NUM_TOKENS": 5, "MASK_CLS_TOKEN": True}),
    ("rewound: tokens 1 and 3 pruned, pieces of tokens 0, 2 and 4", {
        "prompt_length": 5, "kv_length": 5, "pruned_tokens": [1, 3],
        "pruned_pieces": [[2, 5], [], list(range(8)), [], [15]]},
     {"NUM_TOKENS_P": 5, "NUM_TOKENS": 5, "MASK_CLS_TOKEN": True}),
]
MAE_POOLED = "MAE ViT-B/16 (average pooling), pool_prompts true"
VFPT_CASES = [
    ("half of 10 prompts, both axes, prepended (the default)", {"prompt_length": 10},
     {"NUM_TOKENS": 10}),
    ("sequence axis only", {"prompt_length": 10, "fourier_dims": "sequence"},
     {"NUM_TOKENS": 10, "FOURIER_DIMENSION": "sequence"}),
    ("hidden axis only", {"prompt_length": 10, "fourier_dims": "hidden"},
     {"NUM_TOKENS": 10, "FOURIER_DIMENSION": "hidden"}),
    ("Fourier prompts appended", {"prompt_length": 10, "fourier_location": "append"},
     {"NUM_TOKENS": 10, "FOURIER_LOCATION": "append"}),
    ("block 0 not transformed", {"prompt_length": 10, "fourier_first_layer": False},
     {"NUM_TOKENS": 10, "FOURIER_FIRST_LAYER": False}),
    ("every prompt a Fourier prompt, p = 7", {"prompt_length": 7, "fourier_share": 1.0},
     {"NUM_TOKENS": 7, "FOURIER_PERCENTAGE": 1.0}),
    ("share 0.3 of 7 prompts (floor 2.1 = 2)", {"prompt_length": 7, "fourier_share": 0.3},
     {"NUM_TOKENS": 7, "FOURIER_PERCENTAGE": 0.3}),
    # MAE (vit_fourier_mae.py, VIT_POOL_TYPE original): the mean of every token after the class token, prompts
    # included, then fc_norm; ivpt's pool_prompts. Without it (the second row) ivpt averages the patches only
    (MAE_POOLED, {"prompt_length": 10, "pool_prompts": True}, {"NUM_TOKENS": 10}),
    (MAE_POOLED.replace("pool_prompts true", "pool_prompts false"), {"prompt_length": 10, "pool_prompts": False},
     {"NUM_TOKENS": 10}, "different"),
]


# GateVPT's code (ryongithub/GatedPromptTuning), E2VPT's MoCo and MAE models (with a file of its repository added
# to timm, as its README says) and VFPT's MoCo model need timm 0.5.4, ivpt a current timm: ivpt's side runs here,
# the official one in a process with the old timm first on its path, the two exchanging tensors through a file
GATEVPT_CASES = [
    ("MoCo v3 ViT-B/16, p = 10, gates at random logits", {"prompt_length": 10},
     {"NUM_TOKENS": 10, "GATE_PRIOR": True}),
    ("learned temperatures (random in [0.5, 2], two beyond the clamp)", {"prompt_length": 10,
                                                                         "learn_temperature": True},
     {"NUM_TOKENS": 10, "GATE_PRIOR": True, "TEMP_LEARN": True}),
    ("MAE ViT-B/16 (average pooling, the norm after it), pool_prompts true", {"prompt_length": 10,
                                                                             "pool_prompts": True},
     {"NUM_TOKENS": 10, "GATE_PRIOR": True}),
]
# vit_fourier_moco.py reads FOURIER_PERCENTAGE and FOURIER_LOCATION prepend only: both axes, block 0 transformed
VFPT_MOCO_CASES = [
    ("MoCo v3 ViT-B/16, half of 10 prompts (the default)", {"prompt_length": 10}, {"NUM_TOKENS": 10}),
    ("MoCo v3 ViT-B/16, every prompt a Fourier prompt, p = 7", {"prompt_length": 7, "fourier_share": 1.0},
     {"NUM_TOKENS": 7, "FOURIER_PERCENTAGE": 1.0}),
]
# vit_moco_prompt_VK.py and vit_mae_prompt_VK.py: shared key-value prompts only (unshared raises in their code)
E2VPT_SSL_CASES = [
    ("MoCo v3 ViT-B/16, shared key-value prompts, p = n = 5", {"prompt_length": 5, "kv_length": 5},
     {"NUM_TOKENS_P": 5, "NUM_TOKENS": 5, "MASK_CLS_TOKEN": False}),
    ("MoCo v3 ViT-B/16, learned token and piece masks, random values", {"prompt_length": 10, "kv_length": 5,
                                                                        "prune": True},
     {"NUM_TOKENS_P": 10, "NUM_TOKENS": 5, "MASK_CLS_TOKEN": True}),
    ("MAE ViT-B/16 (average pooling), pool_prompts true", {"prompt_length": 5, "kv_length": 5, "pool_prompts": True},
     {"NUM_TOKENS_P": 5, "NUM_TOKENS": 5, "MASK_CLS_TOKEN": False}),
]
OLD_TIMM_CASES = {"gatevpt": GATEVPT_CASES, "vfpt": VFPT_MOCO_CASES, "e2vpt": E2VPT_SSL_CASES}
OLD_TIMM_NEEDS = {"gatevpt": "GateVPT's code", "vfpt": "VFPT's MoCo model (vit_fourier_moco.py)",
                  "e2vpt": "E2VPT's MoCo and MAE models"}


def set_keys(cfg, keys: dict) -> None:
    """The official config node with ``keys`` set; a key it does not have is an error, not a silent default."""
    unknown = set(keys) - set(cfg)
    if unknown:
        raise KeyError(f"not keys of the official config: {sorted(unknown)}")
    cfg.defrost()
    cfg.update(keys)


def random_backbone(**options):
    """timm's ViT-B/16 at random, its biases and LayerNorm affines too (timm initialises them to 0 and 1,
    which would leave the mapping of those tensors unchecked)."""
    import timm
    import torch

    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **options)
    with torch.no_grad():
        for name, tensor in vit.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                tensor.add_(0.05 * torch.randn_like(tensor))
    return vit


def copy_backbone(official, vit) -> None:
    """timm's ViT-B/16 weights into the official (jeonsworld-style) ViT: q, k, v split from timm's qkv."""
    import torch

    transformer = official.transformer
    emb, enc, d = transformer.embeddings, transformer.encoder, vit.embed_dim
    with torch.no_grad():
        emb.patch_embeddings.weight.copy_(vit.patch_embed.proj.weight)
        emb.patch_embeddings.bias.copy_(vit.patch_embed.proj.bias)
        emb.position_embeddings.copy_(vit.pos_embed)
        emb.cls_token.copy_(vit.cls_token)
        for layer, block in zip(enc.layer, vit.blocks):
            for ours, theirs in ((block.norm1, layer.attention_norm), (block.norm2, layer.ffn_norm),
                                 (block.attn.proj, layer.attn.out), (block.mlp.fc1, layer.ffn.fc1),
                                 (block.mlp.fc2, layer.ffn.fc2)):
                theirs.weight.copy_(ours.weight)
                theirs.bias.copy_(ours.bias)
            for part, name in enumerate(("query", "key", "value")):
                getattr(layer.attn, name).weight.copy_(block.attn.qkv.weight[part * d:(part + 1) * d])
                getattr(layer.attn, name).bias.copy_(block.attn.qkv.bias[part * d:(part + 1) * d])
        enc.encoder_norm.weight.copy_(vit.norm.weight)
        enc.encoder_norm.bias.copy_(vit.norm.bias)


def copy_prompts(official, prompts) -> None:
    """ivpt's (N, p, d) prompts: block 0's as the official prompt_embeddings, the others as its deep ones
    (on the model's transformer where it has one, as the supervised models do; else on the model)."""
    holder = getattr(official, "transformer", official)
    holder.prompt_embeddings.copy_(prompts[:1])
    holder.deep_prompt_embeddings.copy_(prompts[1:])


def e2vpt_official(model, keys: dict):
    """The official E2VPT model with ivpt ``model``'s weights, prompts, key-value prompts and masks."""
    import torch
    from src.configs.config import get_cfg
    from src.models.vit_prompt.vit_prompt_VK import PromptedVisionTransformer_Prompt_VK

    from ivpt.methods.e2vpt import survivors

    cfg = get_cfg().MODEL.P_VK
    set_keys(cfg, keys)
    method, config = model.method, model.method.config
    official = PromptedVisionTransformer_Prompt_VK(cfg, "sup_vitb16_imagenet21k", 224, num_classes=-1).eval()
    copy_backbone(official, model.backbone)
    with torch.no_grad():  # a rewound model's prompts: its survivors in place; where pruned, random values,
        # which the official masks must zero (ivpt never holds them)
        prompts = torch.stack([method.block_prompts(i) for i in range(len(model.backbone.blocks))])
        if config.is_pruned:
            pruned = ~survivors(config, prompts.shape[-1])
            prompts = torch.where(pruned, torch.empty_like(prompts).uniform_(-0.5, 0.5), prompts)
        copy_prompts(official, prompts)
        for i, layer in enumerate(official.transformer.encoder.layer):
            if config.kv_shared:
                layer.attn.deep_QKV_embeddings.copy_(method.kv_prompts[i])
            else:
                layer.attn.deep_QKV_embeddings_K.copy_(method.key_prompts[i])
                layer.attn.deep_QKV_embeddings_V.copy_(method.value_prompts[i])
    transformer = official.transformer
    if config.prune:
        with torch.no_grad():
            transformer.prompt_soft_tokens_mask_cls_token.copy_(method.token_scales)
            transformer.prompt_soft_tokens_pieces_mask_cls_token.copy_(method.piece_scales)
    elif cfg.MASK_CLS_TOKEN:  # a rewound model: the code's own masking of the listed tokens and pieces
        transformer.mask_soft_tokens(set(config.pruned_tokens))
        transformer.mask_soft_tokens_pieces({t: set(pieces) for t, pieces in enumerate(config.pruned_pieces)})
    return official


def vfpt_official(model, keys: dict):
    import torch
    from src.configs.config import get_cfg

    cfg = get_cfg().MODEL.PROMPT_FOURIER
    set_keys(cfg, {"DEEP": True, **keys})  # every VFPT config sets DEEP (the default is shallow)
    if model.backbone.global_pool == "avg":  # the MAE model: timm's names, so timm's state dict loads as it is
        from src.models.vit_prompt.vit_fourier_mae import vit_base_patch16

        official = vit_base_patch16(cfg)
        weights = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("head.")}
        missing, unexpected = official.load_state_dict(weights, strict=False)
        assert not unexpected and set(missing) == {"prompt_embeddings", "deep_prompt_embeddings", "head.weight",
                                                   "head.bias"}, (missing, unexpected)
        official.eval()  # (its train() returns None)
        with torch.no_grad():
            copy_prompts(official, model.method.prompts)
        return official
    from src.models.vit_prompt.vit_fourier import PromptedVisionTransformer_Fourier

    official = PromptedVisionTransformer_Fourier(cfg, "sup_vitb16_imagenet21k", 224, num_classes=-1).eval()
    copy_backbone(official, model.backbone)
    with torch.no_grad():
        copy_prompts(official, model.method.prompts)
    return official


def features(official, images):
    """The official model's pooled features: the class token after the final norm (the models built with no
    head), or on MAE the pooled tokens after fc_norm."""
    return official.forward_features(images) if hasattr(official, "fc_norm") else official(images)


def negate_prompts(official):
    """Negate block 6's input prompts in the official model; returns what puts them back."""
    prompts = getattr(official, "transformer", official).deep_prompt_embeddings[5]
    prompts.neg_()
    return prompts.neg_


def attentions(official) -> list:
    """The official model's attention modules, block by block (jeonsworld-style or timm-named)."""
    if hasattr(official, "transformer"):
        return [layer.attn for layer in official.transformer.encoder.layer]
    return [block.attn for block in official.blocks]


def negate_key_values(official):
    """Negate every block's key-value prompts (keys and values, shared or not); returns what puts them back."""
    tensors = [getattr(attn, name) for attn in attentions(official)
               for name in ("deep_QKV_embeddings", "deep_QKV_embeddings_K", "deep_QKV_embeddings_V")
               if hasattr(attn, name)]
    for tensor in tensors:
        tensor.neg_()
    return lambda: [tensor.neg_() for tensor in tensors]


def unmask(official):
    """E2VPT's token and piece masks set to 1 in the official model; returns what puts them back."""
    holder = getattr(official, "transformer", official)
    masks = [holder.prompt_soft_tokens_mask_cls_token, holder.prompt_soft_tokens_pieces_mask_cls_token]
    saved = [mask.clone() for mask in masks]
    for mask in masks:
        mask.fill_(1.0)
    return lambda: [mask.copy_(value) for mask, value in zip(masks, saved)]


def compare(method: str, cases: list) -> list[dict]:
    """Run in the process whose sys.path holds the official repository."""
    import torch

    import ivpt

    build = e2vpt_official if method == "e2vpt" else vfpt_official
    torch.manual_seed(0)
    images = torch.randn(4, 3, 224, 224)
    rows = []
    for number, (name, options, keys, *expected) in enumerate(cases):
        torch.manual_seed(number)
        backbone = random_backbone(**({"global_pool": "avg"} if name.startswith("MAE") else {}))
        model = ivpt.create_model(backbone, method, 10, **options).eval()
        with torch.no_grad():
            randomise_masks(model, options)
            official = build(model, keys)
            theirs = features(official, images)
            ours = model.forward_head(model.forward_features(images), pre_logits=True)
            ours_logits = model.head(ours)

            def control(change) -> float:  # a change the comparison must see: the official model's logits moved by
                undo = change(official)
                moved = float((model.head(features(official, images)) - ours_logits).abs().max())
                undo()
                return moved

            controls = {"block 6's prompts negated": control(negate_prompts)}
            if method == "e2vpt":
                controls["every key-value prompt negated"] = control(negate_key_values)
                if hasattr(official.transformer, "prompt_soft_tokens_mask_cls_token"):
                    controls["the masks at 1"] = control(unmask)
        rows.append(row_of(method, (name, options, keys, *expected), ours, theirs, model.head, controls))
    return rows


def row_of(method: str, case: tuple, ours, theirs, head, controls: dict) -> dict:
    """One configuration's record: the largest differences of features and logits, and the controls'."""
    name, options, keys, *expected = case
    ours_logits, theirs_logits = head(ours), head(theirs)
    row = {"configuration": name, "ivpt_options": options, "official_keys": keys,
           "expected": expected[0] if expected else "equal",
           "max_abs_features": float((ours - theirs).abs().max()), "feature_scale": float(ours.abs().max()),
           "max_abs_logits": float((ours_logits - theirs_logits).abs().max()),
           "logit_scale": float(ours_logits.abs().max()), "controls_max_abs_logits": controls}
    # equal: within the tolerance, where each control (a change the comparison must see) is 10x beyond it
    row["equal"] = (max(row["max_abs_features"], row["max_abs_logits"]) <= TOLERANCE
                    and min(controls.values()) > 10 * TOLERANCE)
    print(f"{method}: {name}: max |difference| features {row['max_abs_features']:.1e} (of up to "
          f"{row['feature_scale']:.2f}), logits {row['max_abs_logits']:.1e} (of up to {row['logit_scale']:.2f}; "
          f"controls {min(controls.values()):.1e} and up): {'equal' if row['equal'] else 'DIFFERENT'}", flush=True)
    return row


def randomise_masks(model, options: dict) -> None:
    """E2VPT's learned token and piece masks (``prune``) at random scales away from 1, so that applying them
    is what is compared."""
    import torch

    if options.get("prune"):
        with torch.no_grad():
            model.method.token_scales.uniform_(0.2, 1.8)
            model.method.piece_scales.uniform_(0.2, 1.8)


def randomise_gates(model) -> None:
    """GateVPT's gates at random logits and its temperatures at random values, two beyond the official clamp
    to [0.01, 10] (as an adapter may hold them), so that copying them is what is compared."""
    import torch

    with torch.no_grad():
        model.method.gate_logits.uniform_(-3, 3)
        for temperature in model.method.temperatures:
            temperature.value.uniform_(0.5, 2.0)
        if len(model.method.temperatures):
            model.method.temperatures[3].value.fill_(25.0)
            model.method.temperatures[8].value.fill_(0.001)


def old_timm_payload(method: str, path: Path) -> list:
    """ivpt's models for OLD_TIMM_CASES[method], their tensors and features, written to ``path`` for the
    official side; returns the (model, features) pairs the comparison needs here."""
    import torch

    import ivpt

    torch.manual_seed(0)
    images, models, cases = torch.randn(4, 3, 224, 224), [], []
    for number, (name, options, keys) in enumerate(OLD_TIMM_CASES[method]):
        torch.manual_seed(number)
        mae = name.startswith("MAE")
        model = ivpt.create_model(random_backbone(**({"global_pool": "avg"} if mae else {})), method, 10,
                                  **options).eval()
        case = {"keys": keys, "mae": mae, "prompts": model.method.prompts.detach().clone()}
        if method == "e2vpt":
            randomise_masks(model, options)
            case.update(kv=model.method.kv_prompts.detach().clone(), masks=(
                model.method.token_scales.detach().clone(), model.method.piece_scales.detach().clone())
                if options.get("prune") else None)
        if method == "gatevpt":
            randomise_gates(model)
            temperatures = [t.value.detach() for t in model.method.temperatures]
            case.update(keys={**keys, "GATE_NUM": len(model.method.gate_logits)},
                        gates=model.method.gate_logits.detach().clone(),
                        temperatures=torch.stack(temperatures) if temperatures else None)
        with torch.no_grad():
            ours = model.forward_head(model.forward_features(images), pre_logits=True)
        backbone = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("head.")}
        cases.append({**case, "backbone": backbone})
        models.append((model, ours))
    torch.save({"images": images, "cases": cases}, path)
    return models


def gatevpt_official_on_old_timm(case: dict):
    """GateVPT's official model for one case, with ivpt's tensors; and the changes its controls make."""
    import importlib

    import torch
    from src.configs.config import get_cfg

    cfg = get_cfg().MODEL.PROMPT
    set_keys(cfg, case["keys"])
    module = importlib.import_module("src.models.vit_prompt." + ("vit_mae" if case["mae"] else "vit_moco"))
    official = (module.vit_base_patch16 if case["mae"] else module.vit_base)(cfg)
    backbone = case["backbone"]
    if case["mae"]:  # timm's average pooling ends in fc_norm (its norm an Identity); GateVPT's MAE model in norm
        backbone = {k.replace("fc_norm.", "norm."): v for k, v in backbone.items()}
    load_backbone(official, backbone)
    with torch.no_grad():
        official.prompt_embeddings.copy_(case["prompts"])
        official.gate_logit.copy_(case["gates"])
        if case["temperatures"] is not None:
            official.temp.copy_(case["temperatures"])

    def replace(tensor, value):  # tensor set to value; returns what puts it back
        saved = tensor.clone()
        tensor.copy_(value)
        return lambda: tensor.copy_(saved)

    controls = {"prompts negated": lambda: replace(official.prompt_embeddings, -official.prompt_embeddings)}
    if case["temperatures"] is not None:
        controls["every temperature at 1"] = lambda: replace(official.temp, torch.ones_like(official.temp))
    controls["every gate at 0.5"] = lambda: replace(official.gate_logit, torch.zeros_like(official.gate_logit))
    return official, controls


def vfpt_official_on_old_timm(case: dict):
    """VFPT's official MoCo v3 model (vit_fourier_moco.py) with ivpt's tensors; and its controls' changes."""
    import torch
    from src.configs.config import get_cfg
    from src.models.vit_prompt.vit_fourier_moco import vit_base

    cfg = get_cfg().MODEL.PROMPT_FOURIER
    set_keys(cfg, {"DEEP": True, **case["keys"]})
    official = vit_base(cfg)
    load_backbone(official, case["backbone"])
    with torch.no_grad():
        copy_prompts(official, case["prompts"])

    def without_transform():  # the Fourier prompts entering as they are (VPT-deep)
        transform, official.FT = official.FT, torch.nn.Identity()
        return lambda: setattr(official, "FT", transform)

    return official, {"block 6's prompts negated": lambda: negate_prompts(official),
                      "the Fourier transform left out": without_transform}


def e2vpt_official_on_old_timm(case: dict):
    """E2VPT's official MoCo v3 or MAE model (vit_moco_prompt_VK.py, vit_mae_prompt_VK.py) with ivpt's
    tensors; and its controls' changes."""
    import importlib

    import torch
    from src.configs.config import get_cfg

    cfg = get_cfg().MODEL.P_VK
    set_keys(cfg, case["keys"])
    module = importlib.import_module("src.models.vit_prompt." + ("vit_mae_prompt_VK" if case["mae"]
                                                                 else "vit_moco_prompt_VK"))
    official = (module.vit_base_patch16 if case["mae"] else module.vit_base)(cfg)
    load_backbone(official, case["backbone"])
    with torch.no_grad():
        copy_prompts(official, case["prompts"])
        for attn, kv in zip(attentions(official), case["kv"]):
            attn.deep_QKV_embeddings.copy_(kv)
        if case["masks"] is not None:
            official.prompt_soft_tokens_mask_cls_token.copy_(case["masks"][0])
            official.prompt_soft_tokens_pieces_mask_cls_token.copy_(case["masks"][1])
    controls = {"block 6's prompts negated": lambda: negate_prompts(official),
                "every key-value prompt negated": lambda: negate_key_values(official)}
    if case["masks"] is not None:
        controls["the masks at 1"] = lambda: unmask(official)
    return official, controls


def load_backbone(official, weights: dict) -> None:
    """timm's ViT-B/16 state dict into an official model built on timm's names; only prompt-method tensors
    and the head may be missing. Leaves it in eval mode."""
    missing, unexpected = official.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith(("head.", "prompt_", "deep_prompt_", "gate_", "temp"))
                                  or k.endswith(".attn.deep_QKV_embeddings") for k in missing), (missing, unexpected)
    official.eval()  # (its train() returns None)


def official_on_old_timm(method: str, path: Path) -> None:
    """The official side: each case's official model; its features and its controls' features, to path.out."""
    import torch

    build = {"gatevpt": gatevpt_official_on_old_timm, "vfpt": vfpt_official_on_old_timm,
             "e2vpt": e2vpt_official_on_old_timm}[method]
    payload, results = torch.load(path), []
    for case in payload["cases"]:
        official, changes = build(case)
        with torch.no_grad():
            features, controls = official.forward_features(payload["images"]), {}
            for what, change in changes.items():
                undo = change()
                controls[what] = official.forward_features(payload["images"])
                undo()
        results.append({"features": features, "controls": controls})
    torch.save(results, f"{path}.out")


def compare_on_old_timm(method: str, repo: Path, old_timm: Path) -> list[dict]:
    """Both sides of OLD_TIMM_CASES[method]: ivpt's here, the official one in a process with timm 0.5.4."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{method}.pt"
        ours = old_timm_payload(method, path)
        if method == "e2vpt":  # E2VPT's README: its timm_added file into timm/models, imported by their __init__
            patched = Path(folder) / "timm"
            shutil.copytree(old_timm / "timm", patched / "timm")
            shutil.copy(repo / "timm_added" / "vision_transformer_changeVK.py", patched / "timm" / "models")
            with open(patched / "timm" / "models" / "__init__.py", "a") as init:
                init.write("from .vision_transformer_changeVK import *\n")
            old_timm = patched
        python_path = os.pathsep.join(filter(None, [str(repo.resolve()), str(old_timm.resolve()),
                                                    os.environ.get("PYTHONPATH")]))
        run = subprocess.run([sys.executable, __file__, "--one", method, "--payload", str(path)], cwd=repo,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": python_path})
        if run.returncode:
            raise SystemExit(f"{method}: the official side on timm 0.5.4 failed:\n{run.stderr[-3000:]}")
        import torch

        theirs = torch.load(f"{path}.out")
    rows = []
    for case, (model, features), official in zip(OLD_TIMM_CASES[method], ours, theirs):
        with torch.no_grad():
            logits = model.head(features)
            controls = {what: float((model.head(moved) - logits).abs().max())
                        for what, moved in official["controls"].items()}
            rows.append(row_of(method, case, features, official["features"], model.head, controls))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--e2vpt", type=Path, help="a checkout of ChengHan111/E2VPT")
    parser.add_argument("--vfpt", type=Path, help="a checkout of runtsang/VFPT")
    parser.add_argument("--gatevpt", type=Path, help="a checkout of ryongithub/GatedPromptTuning")
    parser.add_argument("--old-timm", type=Path, help="a folder holding timm 0.5.4 (pip install --target DIR "
                                                      "--no-deps timm==0.5.4), which GateVPT's code, E2VPT's MoCo "
                                                      "and MAE models and VFPT's MoCo model need")
    parser.add_argument("--one", choices=["e2vpt", "vfpt", "gatevpt"], help=argparse.SUPPRESS)  # a repository's process
    parser.add_argument("--payload", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.payload is not None:
        official_on_old_timm(args.one, args.payload)
        return
    if args.one:
        print("ROWS " + json.dumps(compare(args.one, E2VPT_CASES if args.one == "e2vpt" else VFPT_CASES)))
        return
    for method in ("gatevpt", "e2vpt", "vfpt"):
        if getattr(args, method) is not None and args.old_timm is None:
            raise SystemExit(f"--{method} needs --old-timm: a folder holding timm 0.5.4, which "
                             f"{OLD_TIMM_NEEDS[method]} imports")
    from common import header, write_json

    results = {**header(), "tolerance": TOLERANCE, "backbone": "vit_base_patch16_224 (random weights)"}
    for method, repo in (("e2vpt", args.e2vpt), ("vfpt", args.vfpt)):
        if repo is None:
            continue
        if not (repo / "src" / "models").is_dir():
            raise SystemExit(f"--{method} {repo}: expected a checkout of the official repository (with src/models)")
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        path = os.pathsep.join(filter(None, [str(repo.resolve()), os.environ.get("PYTHONPATH")]))
        run = subprocess.run([sys.executable, __file__, "--one", method], cwd=repo, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": path})
        rows = next((json.loads(line[5:]) for line in run.stdout.splitlines() if line.startswith("ROWS ")), None)
        print("\n".join(line for line in run.stdout.splitlines() if not line.startswith("ROWS ")))
        if rows is None:
            raise SystemExit(f"{method}: the comparison failed:\n{run.stderr[-3000:]}")
        rows += compare_on_old_timm(method, repo, args.old_timm)
        results[method] = {"repository": {"e2vpt": "ChengHan111/E2VPT", "vfpt": "runtsang/VFPT"}[method],
                           "commit": commit.stdout.strip() or None, "rows": rows}
    if args.gatevpt is not None:
        commit = subprocess.run(["git", "-C", str(args.gatevpt), "rev-parse", "HEAD"], capture_output=True, text=True)
        results["gatevpt"] = {"repository": "ryongithub/GatedPromptTuning", "commit": commit.stdout.strip() or None,
                              "rows": compare_on_old_timm("gatevpt", args.gatevpt, args.old_timm)}
    write_json(RESULTS / "official_equality.json", results)


if __name__ == "__main__":
    main()
