"""What the tuned LMs and precompute cost on a GPU: one command, under 8 minutes on one GPU.

    python benchmarks/gpu.py                      # on cuda, writes benchmarks/gpu.md
    python benchmarks/gpu.py --device cpu --quick # small sizes, to check the script on a CPU

1. Frozen MiniLM precompute, float32 against bfloat16 autocast: distinct observations per
   second and the largest feature difference.
2. Milliseconds per TD3+BC update at batch 256: plain MLP, frozen cached (mean and segments
   readout), ln_embed (the paper's LM-Finetune) and lora, float32 and bfloat16.
3. A 1,000-step TD3+BC LM-Finetune run, timed, and the extrapolated cost of the paper's grid
   (4 tasks x 3 seeds x the steps asked for).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import time
from pathlib import Path

import d3rlpy
import numpy as np
import structlog
import torch
import transformers
from run import all_observations, hopper_dataset, machine, table, td3

import lmencoders
from lmencoders.backbone import language_model
from lmencoders.features import clear_feature_caches

HERE = Path(__file__).resolve().parent


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ms_per_update(algo, dataset, batch_size: int, updates: int, device: str) -> float:
    batches = [dataset.sample_transition_batch(batch_size) for _ in range(updates + 1)]
    algo.update(batches[0])  # warm-up (CUDA kernels, allocator)
    synchronize(device)
    start = time.perf_counter()
    for batch in batches[1:]:
        algo.update(batch)
    synchronize(device)
    return (time.perf_counter() - start) / updates * 1e3


def precompute(dataset, device: str, quick: bool) -> str:
    obs, _ = all_observations(dataset)
    obs = np.unique(obs, axis=0)
    wanted = 64 if quick else 20_000
    # the random-policy data has a few thousand states: jittered copies make up the rest
    rng = np.random.default_rng(0)
    jittered = obs[rng.integers(len(obs), size=max(wanted - len(obs), 0))]
    jittered = jittered + rng.normal(0.0, 0.05, jittered.shape) * obs.std(axis=0)
    obs = np.concatenate([obs, jittered.astype(np.float32)])[:wanted]
    rows, features = [], {}
    for precision in ("float32", "bfloat16"):
        # warm-up (kernels for this precision), outside the timing
        lmencoders.embed_observations(
            obs[:512], "hopper", device=device, precision=precision, show_progress=False
        )
        clear_feature_caches()
        synchronize(device)
        start = time.perf_counter()
        features[precision] = lmencoders.embed_observations(
            obs, "hopper", device=device, precision=precision, show_progress=False
        )
        synchronize(device)
        rows.append([precision, len(obs), f"{len(obs) / (time.perf_counter() - start):.0f}"])
    diff = float(np.abs(features["float32"] - features["bfloat16"]).max())
    rows[1].append(f"{diff:.1e}")
    rows[0].append("-")
    return table(["precision", "distinct obs", "obs/s", "max abs diff vs float32"], rows)


def updates(dataset, device: str, quick: bool) -> str:
    batch = 8 if quick else 256
    cheap, costly = (2, 1) if quick else (50, 10)
    rows = []
    plain = ms_per_update(
        td3(dataset, d3rlpy.models.VectorEncoderFactory(), batch, device=device),
        dataset,
        batch,
        cheap,
        device,
    )
    rows.append(["plain MLP encoders", "-", f"{plain:.1f}", "1.0x"])
    cases = [
        ("frozen, cached (mean)", dict(tuning="frozen"), cheap),
        ("frozen, cached (segments readout)", dict(tuning="frozen", pooling="segments"), cheap),
        ("ln_embed (LM-Finetune)", dict(tuning="ln_embed"), costly),
        ("lora", dict(tuning="lora"), costly),
    ]
    for name, settings, count in cases:
        for precision in ("float32", "bfloat16"):
            if settings["tuning"] == "frozen" and precision == "bfloat16":
                continue  # cached rows: no LM in the update
            if precision == "bfloat16" and not device.startswith("cuda"):
                continue  # on a CPU: benchmarks/run.py section 11 (fast only with bf16 units)
            factory = lmencoders.LMEncoderFactory(
                description="hopper", precision=precision, **settings
            )
            if settings["tuning"] == "frozen":
                factory.precompute(dataset, cache_dir=False, device=device, show_progress=False)
            algo = td3(dataset, factory, batch, device=device)
            ms = ms_per_update(algo, dataset, batch, count, device)
            rows.append([name, precision, f"{ms:.1f}", f"{ms / plain:.1f}x"])
    return table(
        ["TD3+BC encoders", "LM precision", f"ms / update (batch {batch})", "vs plain"], rows
    )


def finetune_run(dataset, device: str, quick: bool, grid_steps: int, budget: float) -> str:
    steps = 3 if quick else 1_000
    factory = lmencoders.LMEncoderFactory(description="hopper", tuning="ln_embed")
    algo = td3(dataset, factory, 8 if quick else 256, device=device)
    done, start = 0, time.perf_counter()
    while done < steps and time.perf_counter() - start < budget:
        algo.update(dataset.sample_transition_batch(algo.config.batch_size))
        done += 1
    synchronize(device)
    seconds = time.perf_counter() - start
    per_step = seconds / done
    grid = 4 * 3 * grid_steps * per_step
    return table(
        [
            "run",
            "steps done",
            "seconds",
            "s / step",
            f"paper grid, 4 tasks x 3 seeds x {grid_steps} steps",
        ],
        [
            [
                "TD3+BC LM-Finetune (ln_embed), float32",
                done,
                f"{seconds:.0f}",
                f"{per_step:.3f}",
                f"{grid / 3600:.1f} h (training only)",
            ]
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes; writes nothing")
    parser.add_argument("--grid-steps", type=int, default=100_000, help="steps per grid run")
    parser.add_argument("--out", default=str(HERE / "gpu.md"))
    parser.add_argument(
        "--budget", type=float, default=420.0,
        help="seconds for the whole script; the LM-Finetune run stops when they are spent",
    )  # fmt: skip
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu --quick to check the script")
    d3rlpy.seed(0)
    transformers.utils.logging.disable_progress_bar()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    dataset = hopper_dataset(episodes=8 if args.quick else 200, steps=100)
    language_model(device=args.device)  # loaded before any timing
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    started = time.perf_counter()
    parts = []
    for title, body in [
        (
            "1. Frozen precompute, float32 vs bfloat16",
            lambda: precompute(dataset, args.device, args.quick),
        ),
        ("2. TD3+BC update", lambda: updates(dataset, args.device, args.quick)),
        (
            "3. LM-Finetune training run",
            lambda: finetune_run(
                dataset,
                args.device,
                args.quick,
                args.grid_steps,
                budget=max(30.0, args.budget - (time.perf_counter() - started)),
            ),
        ),
    ]:
        text = f"## {title}\n\n{body()}\n"
        print(text, f"({time.perf_counter() - started:.0f} s so far)\n", flush=True)
        parts.append(text)
    if args.quick:
        return
    header = (
        "# GPU benchmarks\n\n"
        f"Generated by `python benchmarks/gpu.py` on {datetime.date.today().isoformat()}, "
        f"card: {card}; host: {machine()}.\n\n"
    )
    Path(args.out).write_text(header + "\n".join(parts))


if __name__ == "__main__":
    main()
