"""`ivpt --help`, `--version` and every subcommand's `--help` answer without importing torch or timm."""
import subprocess
import sys

import pytest

SUBCOMMANDS = ["train", "eval", "predict", "explain", "params", "tune", "benchmark", "quickstart"]

PROBE = """
import sys
from ivpt.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "timm", "torchvision", "safetensors") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"]] + [[c, "--help"] for c in SUBCOMMANDS])
def test_help_needs_no_torch(argv):
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in done.stdout, (argv, done.stdout[-500:], done.stderr[-500:])
    assert "usage" in done.stdout or "ivpt" in done.stdout
