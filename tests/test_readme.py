"""Every shell and Python block of the README runs (but the two set-up commands, which CI runs)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import photo_folder

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
SETUP = "python3 -m venv .venv"


def test_the_readme_blocks_run(tmp_path):
    shell = [code for kind, code in BLOCKS if kind == "bash" and not code.startswith(SETUP)]
    python = [code for kind, code in BLOCKS if kind == "python"]
    assert len(shell) >= 1 and len(python) >= 1 and len([c for k, c in BLOCKS if c.startswith(SETUP)]) == 2
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for code in shell:
        done = subprocess.run(["bash", "-e", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"README shell block failed:\n{code}\n{done.stderr[-3000:]}"
    for code in python:
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"README Python block failed:\n{done.stderr[-3000:]}"
    assert (tmp_path / "runs" / "readme-cc" / "test.json").is_file()
    assert (tmp_path / "runs" / "readme-copy" / "adapter.safetensors").is_file()


def test_the_own_images_page_runs_on_a_tiny_folder(tmp_path):
    photo_folder(tmp_path / "photos", per_class=10, size=(48, 36))
    page = (ROOT / "docs" / "own-images.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", page, re.DOTALL)
    assert blocks
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for code in blocks:
        done = subprocess.run(["bash", "-e", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"docs/own-images.md block failed:\n{code}\n{done.stderr[-3000:]}"
    assert f"data: folder {(tmp_path / 'photos').resolve()}: 3 classes (cat, dog, owl); train 18, val 6" in done.stdout
    assert (tmp_path / "runs" / "photos" / "explain" / "explain.json").is_file()
    assert json.loads((tmp_path / "runs" / "photos" / "test.json").read_text())["count"] == 6
