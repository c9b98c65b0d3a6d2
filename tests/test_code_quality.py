"""The library's style and typed signatures, checked wherever the tests run (CI included)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lmencoders.ledger import DATASETS, RUNS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_passes(command):
    ruff = shutil.which("ruff")
    assert ruff, "ruff is a test dependency: pip install -e '.[test]'"
    result = subprocess.run([ruff, *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def test_every_library_signature_is_typed():
    rules = "ANN001,ANN201,ANN202,ANN204,ANN205,ANN206"
    ruff = shutil.which("ruff")
    assert ruff
    result = subprocess.run(
        [ruff, "check", "--select", rules, "lmencoders"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_scripts_parse_and_refuse_unknown_stages(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if script.name == "evidence-grid.sh":
        result = subprocess.run(
            ["bash", str(script), "nonsense"], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 2 and "unknown stage nonsense" in result.stderr


@pytest.mark.parametrize(
    "path",
    [
        f"results/grid/{RUNS}/Hopper-v5-low-99-train-td3+bc-vector-seed0-0a1b2c3d.json",
        f"results/grid/{DATASETS}",
        "results/grid/policies/Hopper-v5/policies/sac-190000/model.pt",
        "results/grid/policies/Hopper-v5/sac-checkpoints.json",
    ],
)
def test_what_the_grid_commits_is_not_ignored_by_git(path):
    """The ledger and the kept policies are the grid's memory across machine resets: a
    pattern such as ``runs/`` in .gitignore once kept every run record out of git unseen."""
    if not (ROOT / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-v", path], cwd=ROOT, capture_output=True)
    assert result.returncode == 1, result.stdout.decode()
