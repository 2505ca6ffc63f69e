"""The README's test command is the one CI runs."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_commands = [b for b in blocks if "pytest" in b]
    assert len(test_commands) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_commands[0].strip() in [line.strip() for line in ci]


SPEC_PROMPT_LENGTHS = {
    "cifar": 10, "caltech101": 10, "dtd": 10, "oxford_flowers102": 1, "oxford_iiit_pet": 1, "svhn": 50,
    "sun397": 5, "patch_camelyon": 100, "eurosat": 100, "resisc45": 10, "diabetic_retinopathy": 1,
    "clevr_count": 100, "clevr_dist": 200, "dmlab": 100, "kitti": 100, "dsprites_loc": 100, "dsprites_ori": 100,
    "smallnorb_azi": 200, "smallnorb_ele": 200,
    "CUB_200_2011": 10, "nabirds": 50, "OxfordFlower": 5, "StanfordCars": 200, "StanfordDogs": 100,
}


def test_every_recipe_loads_and_uses_vpts_prompt_length():
    from ivpt.data.fgvc import FGVC_DATASETS
    from ivpt.data.vtab import VTAB_TASKS
    from ivpt.engine.config import load_config

    recipes = sorted((ROOT / "configs").rglob("*.yaml"))
    names = {p.stem for p in recipes}
    assert set(VTAB_TASKS) | set(FGVC_DATASETS) <= names
    for path in recipes:
        cfg = load_config(path)
        if path.stem in SPEC_PROMPT_LENGTHS:
            assert cfg.method_options["prompt_length"] == SPEC_PROMPT_LENGTHS[path.stem], path
            assert (cfg.epochs, cfg.warmup_epochs, cfg.batch_size, cfg.optimizer) == (100, 10, 128, "sgd")
            assert len(cfg.protocol["lrs"]) == 10 and cfg.protocol["seeds"] == [42, 44, 82, 100, 800]


def test_method_protocols_layer_over_every_benchmark_recipe(tmp_path):
    """configs/protocols/*-petl.yaml over each VTAB-1k/FGVC recipe: that method's protocol, the recipe's data."""
    from ivpt.engine.config import ConfigError, load_config

    for family in ("vtab", "fgvc"):
        protocol = ROOT / "configs" / "protocols" / f"{family}-petl.yaml"
        for recipe in sorted((ROOT / "configs" / family).glob("*.yaml")):
            own = load_config(recipe)
            for method in ("lora", "adapter", "adaptformer", "ssf", "bitfit"):
                cfg = load_config([recipe, protocol], [f"method={method}"])
                assert cfg.method == method and cfg.method_options == {}
                assert (cfg.optimizer, cfg.batch_size, cfg.epochs, cfg.lr_scaling) == ("adamw", 64, 100, False)
                assert cfg.data == own.data and cfg.backbone == own.backbone and cfg.output == own.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match=r"'epochz' in .*bad\.yaml"):
        load_config([protocol, bad])


def test_the_wheel_ships_the_recipes_and_the_published_figures(tmp_path):
    """ivpt benchmark runs from an installed ivpt: every recipe of configs/ (a link to src/ivpt/configs) and the
    reference table are package data of the built wheel."""
    import shutil
    import subprocess
    import sys
    import zipfile

    assert (ROOT / "configs").resolve() == (ROOT / "src" / "ivpt" / "configs").resolve()
    source = tmp_path / "source"
    (source / "src").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src" / "ivpt", source / "src" / "ivpt", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("ivpt-*.whl"))).namelist())
    recipes = {f"ivpt/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert len(recipes) >= 31 and recipes <= names
    assert "ivpt/reference/published.json" in names
