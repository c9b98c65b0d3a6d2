"""The README's main job, end to end (slow: real MiniLM, real MuJoCo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


@pytest.mark.slow
def test_quickstart_trains_saves_reloads_and_evaluates(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--episodes",
            "5",
            "--steps",
            "50",
            "--eval-episodes",
            "1",
            "--out",
            str(tmp_path / "model"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"evaluated return of the reloaded policy .*: -?\d+\.\d", result.stdout)
    saved = sum(p.stat().st_size for p in (tmp_path / "model").iterdir())
    assert saved < 10_000_000  # an LM copy alone is 87 MB


@pytest.mark.slow
def test_readme_main_command_trains_on_the_shipped_dataset(tmp_path):
    """`lmencoders train` with its defaults (fewer steps): shipped data, frozen MiniLM, TD3+BC."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmencoders",
            "train",
            "--steps",
            "100",
            "--eval-episodes",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
        env=dict(os.environ, LMENCODERS_CACHE=str(tmp_path / "cache")),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"evaluated return on Hopper-v5 over 1 episodes: -?\d+\.\d", result.stdout)
    assert "normalised score" in result.stdout
    curve = re.findall(r"^step (\d+): return on Hopper-v5 over 1 episodes", result.stdout, re.M)
    assert curve == ["20", "40", "60", "80", "100"]  # five evaluations by default, printed
    assert "Hopper-v5-medium-10-train" in result.stdout  # the shipped default
    model = re.search(r"^model: (.+)$", result.stdout, re.MULTILINE)[1]
    assert Path(model).is_file() and Path(model).with_name("result.json").is_file()
