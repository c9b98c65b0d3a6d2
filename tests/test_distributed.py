"""Two CPU processes (gloo): sharded precompute and DDP training with a tuned LM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import neorl_arrays

from lmencoders.backbone import language_model
from lmencoders.cli import main as cli_main

HERE = Path(__file__).resolve().parent


def torchrun(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1", **(env_extra or {}))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_sharded_precompute_merges_into_the_same_cache_as_one_process(tiny_lm, tmp_path):
    np.savez(tmp_path / "data.npz", **neorl_arrays(3, steps=20))
    assert (
        cli_main(
            [
                "precompute",
                str(tmp_path / "data.npz"),
                "--description",
                "hopper",
                "--model",
                tiny_lm,
                "--cache-dir",
                str(tmp_path / "one"),
            ]
        )
        == 0
    )
    torchrun(
        "-m",
        "lmencoders",
        "precompute",
        str(tmp_path / "data.npz"),
        "--description",
        "hopper",
        "--model",
        tiny_lm,
        "--cache-dir",
        str(tmp_path / "two"),
    )
    [single] = list((tmp_path / "one").iterdir())
    [sharded] = list((tmp_path / "two").iterdir())  # shards merged and removed
    assert single.name == sharded.name
    a, b = np.load(single), np.load(sharded)
    order_a, order_b = np.lexsort(a["codes"].T), np.lexsort(b["codes"].T)
    assert np.array_equal(a["codes"][order_a], b["codes"][order_b])
    assert np.allclose(a["features"][order_a], b["features"][order_b], atol=1e-5)


def test_ddp_training_with_a_tuned_lm_keeps_processes_in_step(tiny_lm, tmp_path):
    out = tmp_path / "policy"
    torchrun(str(HERE / "ddp_train_worker.py"), tiny_lm, str(out))
    rank0 = torch.load(f"{out}.rank0")
    rank1 = torch.load(f"{out}.rank1")
    tuned = [k for k in rank0 if "lm_parameters" in k]
    assert tuned and rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.allclose(rank0[key], rank1[key], atol=1e-6), key
    base = dict(language_model(tiny_lm).model.named_parameters())
    moved = [k for k in tuned if not torch.equal(rank0[k], base[_name(k)])]
    assert moved  # training really changed the LM tensors, in both processes alike


def _name(key: str) -> str:
    return key.split("lm_parameters.")[1].replace("__", ".")
