"""Where the time and memory go: lmencoders against plain MLPs, a plain Hugging Face pipeline
and a hand-written LM encoder, all measured in this one run (ratios, not absolute timings, are
what carries across machines).

    python benchmarks/run.py          # about 8 minutes on 2 CPU cores; writes benchmarks/README.md
    python benchmarks/run.py --quick  # a smoke run with small sizes (prints, writes nothing)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import d3rlpy
import gymnasium as gym
import numpy as np
import structlog
import torch
import transformers

import lmencoders
from lmencoders import statistics as rl_statistics
from lmencoders.backbone import DEFAULT_MODEL, LanguageModel, language_model
from lmencoders.encoders import TextFeatures
from lmencoders.envs import FinRLEnv, episode_returns, make_env
from lmencoders.features import clear_feature_caches, frozen_features
from lmencoders.machine import processor_name
from lmencoders.resume import CHECKPOINT, save_checkpoint
from lmencoders.table import FeatureTable
from lmencoders.tokens import TokenCache, tokenize_texts

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import naive_encoder  # noqa: E402  (registers the baseline's encoder type with d3rlpy)

# --------------------------------------------------------------------------- data


def hopper_dataset(episodes: int, steps: int, seed: int = 0) -> d3rlpy.dataset.MDPDataset:
    """Real Hopper-v5 (NeoRL layout) transitions of a noisy periodic gait."""
    env = gym.make("Hopper-v5", exclude_current_positions_from_observation=False)
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "term", "timeout")}
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        for t in range(steps):
            action = np.clip(
                0.6 * np.sin(0.35 * t + np.array([0, 1.5, 3])) + rng.normal(0, 0.3, 3), -1, 1
            ).astype(np.float32)
            next_obs, reward, terminated, _, _ = env.step(action)
            for key, value in zip(
                rows, (obs, action, reward, terminated, t == steps - 1 and not terminated)
            ):
                rows[key].append(value)
            obs = next_obs
            if terminated:
                break
    return d3rlpy.dataset.MDPDataset(
        np.asarray(rows["obs"], np.float32),
        np.asarray(rows["act"]),
        np.asarray(rows["rew"], np.float32),
        np.asarray(rows["term"]),
        np.asarray(rows["timeout"]),
        action_space=d3rlpy.ActionSpace.CONTINUOUS,
    )


def all_observations(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Observations and next observations of every transition, as a dataset file holds them."""
    obs, next_obs = [], []
    for ep in dataset.episodes:
        obs.append(ep.observations[:-1])
        next_obs.append(ep.observations[1:])
    return np.concatenate(obs), np.concatenate(next_obs)


def with_features(dataset) -> d3rlpy.dataset.MDPDataset:
    """The dataset with each observation replaced by [frozen LM features ++ observation]."""
    parts: dict[str, list] = {k: [] for k in ("obs", "act", "rew", "term", "timeout")}
    for ep in dataset.episodes:
        features = lmencoders.embed_observations(ep.observations, "hopper", show_progress=False)
        parts["obs"].append(np.concatenate([features, ep.observations], axis=1))
        parts["act"].append(ep.actions)
        parts["rew"].append(ep.rewards)
        end = np.zeros(len(ep.observations), bool)
        end[-1] = True
        parts["term"].append(end & bool(ep.terminated))
        parts["timeout"].append(end & (not ep.terminated))
    return d3rlpy.dataset.MDPDataset(
        *(np.concatenate(parts[k]) for k in parts), action_space=d3rlpy.ActionSpace.CONTINUOUS
    )


def finrl_dataset(days: int, seed: int = 0) -> d3rlpy.dataset.MDPDataset:
    """One FinRL episode over ``days`` real market days (random holdings, trades, rewards):
    timing needs the real observation width and texts, not a trading policy."""
    obs = finrl_observations(days, seed).astype(np.float32)
    rng = np.random.default_rng(seed)
    terminals = np.zeros(len(obs), bool)
    terminals[-1] = True
    return d3rlpy.dataset.MDPDataset(
        obs,
        rng.uniform(-1, 1, (len(obs), FinRLEnv().n)).astype(np.float32),
        rng.normal(0, 1, len(obs)).astype(np.float32),
        terminals,
        action_space=d3rlpy.ActionSpace.CONTINUOUS,
    )


def finrl_observations(n: int, seed: int = 0) -> np.ndarray:
    """FinRL observations from NeoRL's market file (as FinRLEnv reads it): cash, prices and
    indicators of a trading day, random holdings."""
    market = FinRLEnv()
    rng = np.random.default_rng(seed)
    out = []
    for day in range(min(n, len(market.dates))):
        shares = rng.integers(0, 300, size=market.n).astype(float)
        cash = float(rng.uniform(1e5, 1e6))
        out.append(
            np.concatenate([[cash], market.close[day], shares, market.features[day].reshape(-1)])
        )
    return np.asarray(out)


# --------------------------------------------------------------------------- helpers


class PassCounter:
    """Counts texts and calls that reach the LM (wraps LanguageModel.encode_prepared, which
    every LM pass goes through: ``encode`` and the tuned encoders' prepared batches)."""

    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0
        self._original = LanguageModel.encode_prepared

    def __enter__(self) -> PassCounter:
        counter, original = self, self._original

        def counting(lm, prepared, *args, **kwargs):
            counter.calls += 1
            counter.texts += len(prepared.inverse)
            return original(lm, prepared, *args, **kwargs)

        LanguageModel.encode_prepared = counting
        return self

    def __exit__(self, *exc) -> None:
        LanguageModel.encode_prepared = self._original


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def td3(dataset, encoder_factory, batch_size: int, share: bool = False, device: str = "cpu"):
    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    if isinstance(encoder_factory, lmencoders.LMEncoderFactory):
        encoder_factory.observation_scaler = scaler
    algo = d3rlpy.algos.TD3PlusBCConfig(
        actor_encoder_factory=encoder_factory,
        critic_encoder_factory=encoder_factory,
        observation_scaler=scaler,
        batch_size=batch_size,
        q_func_factory=d3rlpy.models.MeanQFunctionFactory(share_encoder=share),
    ).create(device=device)
    algo.fit(
        dataset,
        n_steps=1,
        n_steps_per_epoch=1,
        show_progress=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )  # builds, fits the scaler
    return algo


def time_updates(algo, dataset, batch_size: int, updates: int) -> tuple[float, float]:
    """Seconds per TD3+BC update and LM calls per update, on pre-sampled batches, after one
    untimed update (first-call allocations and index builds are not a per-update cost)."""
    batches = [dataset.sample_transition_batch(batch_size) for _ in range(updates)]
    algo.update(dataset.sample_transition_batch(batch_size))
    with PassCounter() as counter:
        start = time.perf_counter()
        for batch in batches:
            algo.update(batch)
        seconds = (time.perf_counter() - start) / updates
    return seconds, counter.calls / updates


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


# --------------------------------------------------------------------------- sections


def update_time(dataset, quick: bool) -> str:
    small, large = (8, 64) if quick else (32, 256)
    lm_updates, cheap_updates = (1, 5) if quick else (2, 50)
    rows = []

    plain = td3(dataset, d3rlpy.models.VectorEncoderFactory(), small)
    base_small, _ = time_updates(plain, dataset, small, cheap_updates)

    def add(name, algo, batch, updates, baseline, data=dataset):
        seconds, passes = time_updates(algo, data, batch, updates)
        rows.append(
            [name, batch, f"{seconds * 1e3:.1f}", f"{seconds / baseline:.2f}x", f"{passes:.1f}"]
        )

    add("plain MLP encoders (d3rlpy default)", plain, small, cheap_updates, base_small)
    frozen = lmencoders.LMEncoderFactory(description="hopper")
    frozen.precompute(dataset, cache_dir=False, show_progress=False)
    wide = with_features(dataset)
    add(
        "same-size MLP fed [features ++ obs] as a 396-dim vector (the limit)",
        td3(wide, d3rlpy.models.VectorEncoderFactory(), small),
        small,
        cheap_updates,
        base_small,
        wide,
    )
    add(
        "LM frozen, cached (precomputed)",
        td3(dataset, frozen, small),
        small,
        cheap_updates,
        base_small,
    )
    standardized = lmencoders.LMEncoderFactory(description="hopper", standardize_features=True)
    standardized.precompute(dataset, cache_dir=False, show_progress=False)
    add(
        "LM frozen, cached, standardize_features",
        td3(dataset, standardized, small),
        small,
        cheap_updates,
        base_small,
    )
    uncached = td3(
        dataset, lmencoders.LMEncoderFactory(description="hopper", max_length=255), small
    )
    description = lmencoders.load_description("hopper")
    frozen_features(DEFAULT_MODEL, description, max_length=255).table = FeatureTable(
        description.size, 384, max_rows=0
    )  # no table: every encoder call runs the LM
    add(
        "LM frozen, no feature table (LM on each distinct batch)",
        uncached,
        small,
        lm_updates,
        base_small,
    )
    ln = lmencoders.LMEncoderFactory(description="hopper", tuning="ln_embed")
    add("LM ln_embed", td3(dataset, ln, small), small, lm_updates, base_small)
    add(
        "LM ln_embed, critics share one encoder",
        td3(dataset, ln, small, share=True),
        small,
        lm_updates,
        base_small,
    )

    plain_large = td3(dataset, d3rlpy.models.VectorEncoderFactory(), large)
    base_large, _ = time_updates(plain_large, dataset, large, cheap_updates)
    rows.append(
        ["plain MLP encoders (d3rlpy default)", large, f"{base_large * 1e3:.1f}", "1.00x", "0.0"]
    )
    add(
        "same-size MLP fed [features ++ obs] as a 396-dim vector (the limit)",
        td3(wide, d3rlpy.models.VectorEncoderFactory(), large),
        large,
        cheap_updates,
        base_large,
        wide,
    )
    add(
        "LM frozen, cached (precomputed)",
        td3(dataset, frozen, large),
        large,
        cheap_updates,
        base_large,
    )
    add(
        "LM frozen, cached, standardize_features",
        td3(dataset, standardized, large),
        large,
        cheap_updates,
        base_large,
    )
    return table(
        ["encoders", "batch", "ms / update", "vs plain (same batch)", "LM calls / update"], rows
    )


def straightforward_hf(texts: list[str], batch_size: int = 256) -> np.ndarray:
    """The baseline pipeline: batches of 256 in dataset order, padded to the longest, mean pool."""
    path = lmencoders.backbone.resolve_model_path(DEFAULT_MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(out)


def precompute_throughput(dataset, quick: bool) -> str:
    obs, next_obs = all_observations(dataset)
    n = 64 if quick else 512
    obs, next_obs = obs[:n], next_obs[:n]
    description = lmencoders.load_description("hopper")
    rows = []

    def row(name: str, data: np.ndarray, base: float, seconds: float, reference) -> list:
        ours = lmencoders.embed_observations(data, description, show_progress=False)
        rate = len(data) / seconds
        diff = float(np.abs(ours - reference).max())
        distinct = len(np.unique(data, axis=0))
        return [name, len(data), distinct, f"{base:.1f}", f"{rate:.1f}", f"{rate / base:.2f}x",
                f"{diff:.1e}"]  # fmt: skip

    for name, data in [
        ("distinct observations", obs),
        ("a dataset's obs + next_obs", np.concatenate([obs, next_obs])),
    ]:
        start = time.perf_counter()
        reference = straightforward_hf(description.format(data))
        base = len(data) / (time.perf_counter() - start)
        clear_feature_caches()
        start = time.perf_counter()
        lmencoders.embed_observations(data, description, show_progress=False)
        rows.append(row(name, data, base, time.perf_counter() - start, reference))
    # the same pass through precompute_features into a cache folder: in one part, or in the
    # resumable parts a long precompute is saved in (against the same plain HF rate)
    for part_rows in (10**9, 16 if quick else 256):
        clear_feature_caches()
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            lmencoders.precompute_features(
                data, description, cache_dir=folder, part_rows=part_rows, show_progress=False
            )
            seconds = time.perf_counter() - start
        parts = "one cache file" if part_rows > len(data) else f"parts of {part_rows} rows"
        rows.append(row(f"{name}, cached in {parts}", data, base, seconds, reference))
    return table(
        [
            "observations",
            "rows",
            "distinct",
            "plain HF obs/s",
            "lmencoders obs/s",
            "speed-up",
            "max abs diff",
        ],
        rows,
    )


def memory_and_checkpoints(dataset, quick: bool) -> str:
    batch, updates = 8, (1 if quick else 4)
    rows = []
    lm_bytes = sum(p.numel() * 4 for p in language_model().model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        naive_encoder.CALLS["lm_forward"] = 0
        algo = td3(dataset, naive_encoder.NaiveLMEncoderFactory(description="hopper"), batch)
        naive_encoder.CALLS["lm_forward"] = 0
        batches = [dataset.sample_transition_batch(batch) for _ in range(updates)]
        for b in batches:
            algo.update(b)
        passes = naive_encoder.CALLS["lm_forward"] / updates
        copies = sum(
            isinstance(m, transformers.BertModel)
            for module in algo.impl.modules.get_torch_modules().values()
            for m in module.modules()
        )
        algo.save(os.path.join(tmp, "naive.d3"))
        rows.append(
            [
                "hand-written (LM inside each encoder), frozen",
                f"{passes:.1f}",
                copies,
                mb(copies * lm_bytes),
                mb(os.path.getsize(os.path.join(tmp, "naive.d3"))),
            ]
        )
        del algo
        plain = td3(dataset, d3rlpy.models.VectorEncoderFactory(), batch)
        plain.save(os.path.join(tmp, "plain.d3"))
        size = mb(os.path.getsize(os.path.join(tmp, "plain.d3")))
        rows.append(["plain MLP encoders (no LM)", "0.0", 0, "0.0", size])
        for tuning in ["frozen", "ln_embed", "lora", "full"]:
            factory = lmencoders.LMEncoderFactory(description="hopper", tuning=tuning)
            if tuning == "frozen":
                factory.precompute(dataset, cache_dir=False, show_progress=False)
            algo = td3(dataset, factory, batch)
            _, passes = time_updates(algo, dataset, batch, updates)
            trained = sum(
                p.numel() * 4
                for module in algo.impl.modules.get_torch_modules().values()
                for name, p in module.named_parameters()
                if "lm_parameters" in name
            )
            bodies = {
                id(language_model(f.model_name, f.tuning).model)
                for module in algo.impl.modules.get_torch_modules().values()
                for f in module.modules()
                if isinstance(f, TextFeatures)
            }
            path = os.path.join(tmp, f"{tuning}.d3")
            algo.save(path)
            rows.append(
                [
                    f"lmencoders {tuning}",
                    f"{passes:.1f}",
                    len(bodies),
                    mb(trained),
                    mb(os.path.getsize(path)),
                ]
            )
            del algo
    return table(
        [
            "TD3+BC on Hopper",
            "LM calls / update",
            "LM bodies used by the 6 encoders",
            "trained LM tensors, all encoders (MB)",
            "checkpoint .d3 (MB)",
        ],
        rows,
    )


def action_latency(dataset, quick: bool) -> str:
    repeats = 5 if quick else 20
    obs = dataset.episodes[0].observations
    description = lmencoders.load_description("hopper")
    lm = language_model()
    text = description.format(obs[:1])

    def bare():
        with torch.no_grad():
            lm.model(**lm.tokenizer(text, return_tensors="pt"))

    factory = lmencoders.LMEncoderFactory(description="hopper")
    algo = td3(dataset, factory, 32)
    plain = td3(dataset, d3rlpy.models.VectorEncoderFactory(), 32)
    rng = np.random.default_rng(0)
    fresh = iter(obs[:1] + rng.normal(0, 1e-3, size=(repeats, obs.shape[1])).astype(np.float32))
    seen = obs[:1]
    algo.predict(seen)
    bare_s = median_seconds(bare, repeats)
    rows = [
        ["bare MiniLM forward of one text", f"{bare_s * 1e3:.1f}", "1.00x"],
        [
            "lmencoders predict, new observation (LM runs)",
            f"{median_seconds(lambda: algo.predict(next(fresh)[None]), repeats) * 1e3:.1f}",
            None,
        ],
        [
            "lmencoders predict, seen observation (table hit)",
            f"{median_seconds(lambda: algo.predict(seen), repeats) * 1e3:.1f}",
            None,
        ],
        [
            "plain MLP predict",
            f"{median_seconds(lambda: plain.predict(seen), repeats) * 1e3:.2f}",
            None,
        ],
    ]
    for row in rows[1:]:
        row[2] = f"{float(row[1]) / (bare_s * 1e3):.2f}x"
    return table(["batch 1 action", "ms (median)", "vs bare LM forward"], rows)


def growth(dataset, quick: bool) -> str:
    lm = language_model()
    hopper_obs = np.concatenate([ep.observations for ep in dataset.episodes])
    cases = [
        ("hopper", hopper_obs[: 32 if quick else 256]),
        ("finrl", finrl_observations(8 if quick else 64)),
    ]
    rows = []
    for name, obs in cases:
        description = lmencoders.load_description(name)
        segments = description.format_segments(obs)
        chunks = lmencoders.tokens.tokenize_texts(
            lm.tokenizer, segments, description.separator, lm.window
        )
        tokens = sum(len(c) for c in chunks.ids) / len(obs)
        fmt_us = median_seconds(lambda d=description, o=obs: d.format(o), 3) / len(obs) * 1e6
        texts = [description.separator.join(s) for s in segments]
        one_call_us = median_seconds(lambda t=texts: lm.tokenizer(t), 3) / len(obs) * 1e6
        tokenise_us = (
            median_seconds(
                lambda s=segments, d=description: lmencoders.tokens.tokenize_texts(
                    lm.tokenizer, s, d.separator, lm.window
                ),
                3,
            )
            / len(obs)
            * 1e6
        )
        clear_feature_caches()
        start = time.perf_counter()
        lmencoders.embed_observations(obs, description, show_progress=False)
        rate = len(obs) / (time.perf_counter() - start)
        cache = frozen_features(DEFAULT_MODEL, description)
        batch = obs[np.random.default_rng(0).integers(0, len(obs), 256)]
        lookup_us = median_seconds(lambda c=cache, b=batch: c(b), 20) * 1e6
        rows.append(
            [
                f"{name} ({description.size} dims)",
                f"{tokens:.0f}",
                f"{len(chunks.ids) / len(obs):.1f}",
                f"{fmt_us:.0f}",
                f"{tokenise_us:.0f}",
                f"{tokenise_us / one_call_us:.2f}x",
                f"{rate:.1f}",
                f"{lookup_us:.0f}",
            ]
        )
    size_rows = []
    description = lmencoders.load_description("hopper")
    rng = np.random.default_rng(1)
    for n in [1_000, 10_000] if quick else [1_000, 10_000, 100_000, 1_000_000]:
        codes = description.quantize(rng.standard_normal((n, description.size)))
        table_ = FeatureTable(description.size, 384)
        table_.insert(codes, np.zeros((n, 384), np.float32))
        batch = codes[rng.integers(0, n, 256)]
        lookup_us = median_seconds(lambda t=table_, b=batch: t.gather(t.lookup(b)[1]), 20) * 1e6
        size_rows.append([f"{n:,}", f"{lookup_us:.0f}"])
    return (
        table(
            [
                "observation",
                "tokens / obs",
                "chunks / obs",
                "text formatting us / obs",
                "tokenising (chunked) us / obs",
                "vs one tokenizer call on the whole texts",
                "precompute obs/s",
                "cached lookup of 256 rows, us",
            ],
            rows,
        )
        + "\n\n"
        + table(
            ["rows in the feature table (Hopper)", "lookup + gather of 256 rows, us"], size_rows
        )
    )


def evaluation_time(dataset, quick: bool) -> str:
    episodes = 3 if quick else 5
    rows, results = [], []
    for name, lockstep in [("one episode at a time", False), ("lockstep", True)]:
        clear_feature_caches()  # a fresh policy and feature table: every observation is new
        d3rlpy.seed(0)
        algo = td3(dataset, lmencoders.LMEncoderFactory(description="hopper"), 32)
        batches = []

        def act(observations: np.ndarray, algo=algo, batches=batches) -> np.ndarray:
            batches.append(len(observations))
            return algo.predict(observations)

        start = time.perf_counter()
        if lockstep:
            envs = [make_env("Hopper-v5") for _ in range(episodes)]
            results.append(episode_returns(act, envs, seed=0))
        else:
            results.append(
                [episode_returns(act, [make_env("Hopper-v5")], seed=i)[0] for i in range(episodes)]
            )
        seconds = time.perf_counter() - start
        rows.append([name, sum(batches), len(batches), f"{seconds:.1f}", seconds])
    # Batched LM passes differ from batch-1 passes in the last float bits, and the simulation
    # carries such differences forward: returns agree closely, not bitwise.
    difference = np.max(np.abs(np.subtract(*results)) / np.abs(results[0]))
    if difference > 1e-2:
        raise AssertionError(f"lockstep returns {results[1]} differ from {results[0]}")
    base = rows[0][-1]
    rows = [r[:-1] + [f"{base / r[-1]:.2f}x"] for r in rows]
    headers = ["Hopper episodes", "env steps", "LM passes", "seconds", "speed-up"]
    return table(headers, rows) + f"\n\nLargest relative difference of a return: {difference:.1e}."


# --------------------------------------------------------------------------- main


def piece_features(dataset, quick: bool) -> str:
    """pooling="segments" against frozen mean pooling: update cost, table memory, precompute,
    on Hopper (12 pieces) and FinRL (31 pieces, the widest table a grid run reads)."""
    batch, updates = (64, 5) if quick else (256, 40)
    rows = []
    language_model()  # loaded before any timing
    for task, data in [("hopper", dataset), ("finrl", finrl_dataset(16 if quick else 64))]:
        distinct = len(np.unique(all_observations(data)[0], axis=0))
        timing = []
        for pooling in ("mean", "segments"):
            factory = lmencoders.LMEncoderFactory(description=task, pooling=pooling)
            clear_feature_caches()
            start = time.perf_counter()
            factory.precompute(data, cache_dir=False, show_progress=False)
            rate = distinct / (time.perf_counter() - start)
            seconds, _ = time_updates(td3(data, factory, batch), data, batch, updates)
            timing.append((f"{task}, pooling {pooling}", seconds, rate))
        if task == "hopper":  # both tables (a grid with LM-No-Tune and LM-Segments)
            clear_feature_caches()
            start = time.perf_counter()
            lmencoders.LMEncoderFactory(description=task).precompute(
                data, cache_dir=False, show_progress=False, also_pooling="segments"
            )
            both = distinct / (time.perf_counter() - start)
            apart = 1 / sum(1 / rate for _, _, rate in timing)
            timing += [
                (f"{task}, mean + segments tables, {label}", None, rate)
                for label, rate in [("one pass each", apart), ("one pass (`also_pooling`)", both)]
            ]
        base_seconds, base_rate = timing[0][1], timing[0][2]
        for label, seconds, rate in timing:
            rows.append(
                [
                    f"TD3+BC, frozen MiniLM, {label}" if seconds else label,
                    batch if seconds else "-",
                    f"{seconds * 1e3:.1f}" if seconds else "-",
                    f"{seconds / base_seconds:.2f}x" if seconds else "-",
                    f"{rate:.1f}",
                    f"{rate / base_rate:.2f}x",
                ]
            )
    speed = table(
        [
            "encoders",
            "batch",
            "ms / update",
            "vs mean pooling",
            "precompute distinct obs/s",
            "vs mean pooling",
        ],
        rows,
    )
    obs, _ = all_observations(dataset)
    memory = []
    finrl = finrl_observations(16 if quick else 64)
    for task, data in [("hopper", obs[: 64 if quick else 512]), ("finrl", finrl)]:
        mean = lmencoders.embed_observations(data, task, show_progress=False)
        description = lmencoders.load_description(task)
        segments = description.format_segments(data)  # float32 forward, before table storage
        pieces = language_model().encode_pieces(segments, description.separator).numpy()
        half = pieces.astype(np.float16).astype(np.float32)
        memory.append(
            [
                task,
                pieces.shape[1],
                f"{mean[0].nbytes / 1024:.1f}",
                f"{pieces[0].nbytes / 1024:.1f}",
                f"{pieces[0].nbytes / 2 / 1024:.1f} (stored)",
                f"{float(np.abs(half - pieces).max()):.1e}",
                f"{float(np.abs(pieces).max()):.1f}",
            ]
        )
    sizes = table(
        [
            "description",
            "pieces",
            "mean pooling KiB / obs",
            "segments float32 KiB / obs",
            "segments float16 KiB / obs",
            "max abs float16 error",
            "max abs feature",
        ],
        memory,
    )
    return f"{speed}\n\nFeature table memory per distinct observation:\n\n{sizes}"


def host_work(dataset, quick: bool) -> str:
    """What a tuned encoder does on the host per LM pass, before the LM runs: render the batch
    as text and tokenise it; from scratch, and from the caches (dataset observations repeat)."""
    obs, _ = all_observations(dataset)
    batch = obs[: 32 if quick else 256]
    description = lmencoders.load_description("hopper")
    lm = language_model()
    window = lm.window
    cache = TokenCache()
    segments = description.format_segments(batch)
    description.cached_segments(batch)
    cache.chunks(lm.tokenizer, segments, description.separator, window)
    repeats = 3 if quick else 20
    rows = []
    for step, scratch, cached in [
        (
            "render text",
            lambda: description.format_segments(batch),
            lambda: description.cached_segments(batch),
        ),
        (
            "tokenise",
            lambda: tokenize_texts(lm.tokenizer, segments, description.separator, window),
            lambda: cache.chunks(lm.tokenizer, segments, description.separator, window),
        ),
    ]:
        fresh, kept = median_seconds(scratch, repeats), median_seconds(cached, repeats)
        rows.append(
            [step, len(batch), f"{fresh * 1e3:.2f}", f"{kept * 1e3:.2f}", f"{fresh / kept:.0f}x"]
        )
    return table(["host step", "texts", "from scratch ms", "cached ms", "speed-up"], rows)


def sampling(dataset, quick: bool) -> str:
    batch, repeats = (64, 5) if quick else (256, 50)
    flat = lmencoders.flat_sampling(dataset)
    np.random.seed(0)
    theirs = dataset.sample_transition_batch(batch)
    np.random.seed(0)
    ours = flat.sample_transition_batch(batch)  # also lays the dataset out, once
    same = all(
        np.array_equal(getattr(ours, f), getattr(theirs, f))
        for f in ("observations", "actions", "rewards", "next_observations", "terminals")
    )
    frozen = lmencoders.LMEncoderFactory(description="hopper")
    frozen.precompute(dataset, cache_dir=False, show_progress=False)
    algos = {
        "plain MLP encoders": td3(dataset, d3rlpy.models.VectorEncoderFactory(), batch),
        "LM frozen, cached": td3(dataset, frozen, batch),
    }

    def row(name: str, step: Callable[[Any], object]) -> list:
        step(flat)  # first-call allocations
        slow = median_seconds(functools.partial(step, dataset), repeats)
        fast = median_seconds(functools.partial(step, flat), repeats)
        return [name, batch, f"{slow * 1e3:.2f}", f"{fast * 1e3:.2f}", f"{slow / fast:.2f}x"]

    rows = [row("a batch alone", lambda buffer: buffer.sample_transition_batch(batch))]
    for label, algo in algos.items():
        rows.append(
            row(
                f"a TD3+BC step (batch + update), {label}",
                lambda buffer, algo=algo: algo.update(buffer.sample_transition_batch(batch)),
            )
        )
    return (
        table(["what", "batch", "d3rlpy's sampling ms", "flat sampling ms", "speed-up"], rows)
        + f"\n\nSame batches as d3rlpy's (same seed, compared bit for bit): {same}."
    )


def run_checkpoints(dataset, quick: bool) -> str:
    """What the checkpoint a run writes after every epoch costs, against the epoch it saves.
    Tuned LMs update at batch 32 (the paper's LM-Finetune; 256 takes minutes an update here)."""
    updates, repeats = (1, 1) if quick else (3, 3)
    encoders: list[tuple[str, Any, int]] = [
        ("plain MLP encoders", d3rlpy.models.VectorEncoderFactory(), 256)
    ]
    for tuning in ("frozen", "ln_embed", "full"):
        factory = lmencoders.LMEncoderFactory(description="hopper", tuning=tuning)
        encoders.append((f"LM {tuning}", factory, 256 if tuning == "frozen" else 32))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, factory, batch in encoders:
            batch = 32 if quick else batch
            if isinstance(factory, lmencoders.LMEncoderFactory) and factory.tuning == "frozen":
                factory.precompute(dataset, cache_dir=False, show_progress=False)
            algo = td3(dataset, factory, batch)
            update, _ = time_updates(algo, dataset, batch, updates)

            def save(algo=algo) -> None:
                save_checkpoint(algo, Path(tmp), epoch=1, train_seconds=0.0, evaluator={})

            write = median_seconds(save, repeats)
            size = os.path.getsize(Path(tmp) / CHECKPOINT)
            rows.append(
                [
                    label,
                    mb(size),
                    f"{write * 1e3:.0f}",
                    batch,
                    f"{update * 1e3:.1f}",
                    f"{100 * write / (10_000 * update):.3f}%",
                ]
            )
            del algo
    return table(
        [
            "TD3+BC encoders",
            "checkpoint.pt (MB)",
            "write ms",
            "batch",
            "update ms",
            "write / a 10,000-step epoch",
        ],
        rows,
    )


def cpu_bfloat16_flags() -> str:
    """The CPU's bfloat16 instructions as Linux lists them (without them autocast emulates)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    found = sorted(f for f in flags if "bf16" in f)
    return ", ".join(found) if found else "none"


def cpu_precision(dataset, quick: bool) -> str:
    """float32 against bfloat16 autocast on this CPU: frozen precompute (Hopper and FinRL texts)
    and the tuned ln_embed update. Precisions alternate and each keeps its best of two passes,
    so a neighbour's load hurts both alike."""
    obs, _ = all_observations(dataset)
    rows = []
    work = [
        ("hopper", np.unique(obs, axis=0)[: 32 if quick else 256]),
        ("finrl", finrl_observations(4 if quick else 32)),
    ]
    for task, data in work:
        rates: dict[str, float] = {}
        features: dict[str, np.ndarray] = {}
        for _ in range(2):
            for precision in ("float32", "bfloat16"):
                clear_feature_caches()
                start = time.perf_counter()
                features[precision] = lmencoders.embed_observations(
                    data, task, precision=precision, show_progress=False
                )
                rate = len(data) / (time.perf_counter() - start)
                rates[precision] = max(rate, rates.get(precision, 0.0))
        diff = float(np.abs(features["float32"] - features["bfloat16"]).max())
        rows.append(
            [
                f"frozen precompute, {task} ({len(data)} distinct obs)",
                "obs/s",
                f"{rates['float32']:.1f}",
                f"{rates['bfloat16']:.1f}",
                f"{rates['bfloat16'] / rates['float32']:.2f}x",
                f"{diff:.1e}",
            ]
        )
    batch, updates = (4, 1) if quick else (32, 2)
    seconds: dict[str, float] = {}
    for precision in ("float32", "bfloat16"):
        factory = lmencoders.LMEncoderFactory(
            description="hopper", tuning="ln_embed", precision=precision
        )
        seconds[precision], _ = time_updates(td3(dataset, factory, batch), dataset, batch, updates)
    rows.append(
        [
            f"TD3+BC update, ln_embed (LM-Finetune), batch {batch}",
            "ms",
            f"{seconds['float32'] * 1e3:.0f}",
            f"{seconds['bfloat16'] * 1e3:.0f}",
            f"{seconds['float32'] / seconds['bfloat16']:.2f}x",
            "-",
        ]
    )
    return f"CPU bfloat16 instructions: {cpu_bfloat16_flags()}.\n\n" + table(
        ["work", "unit", "float32", "bfloat16", "bfloat16 speed-up", "max abs feature diff"],
        rows,
    )


def baseline_updates(dataset, quick: bool) -> str:
    batch_size, updates = (64, 3) if quick else (256, 60)
    configs = {
        "TD3+BC": d3rlpy.algos.TD3PlusBCConfig(batch_size=batch_size),
        "CQL (d3rlpy's 10 sampled actions)": d3rlpy.algos.CQLConfig(batch_size=batch_size),
        "BCQ (d3rlpy's 100 sampled actions)": d3rlpy.algos.BCQConfig(batch_size=batch_size),
        "BCQ-10 (the BCQ paper's 10)": d3rlpy.algos.BCQConfig(
            batch_size=batch_size, n_action_samples=10
        ),
    }
    rows, baseline = [], None
    for name, config in configs.items():
        algo = config.create(device="cpu")
        algo.build_with_dataset(dataset)
        seconds, _ = time_updates(algo, dataset, batch_size, updates)
        baseline = baseline or seconds
        rows.append([name, f"{seconds * 1e3:.1f}", f"{seconds / baseline:.1f}x"])
    return table([f"update, batch {batch_size}", "ms", "vs TD3+BC"], rows)


def report_statistics(dataset, quick: bool) -> str:
    """One bootstrap interval as `lmencoders report` draws it, with rliable's metrics inside
    and with lmencoders.statistics' NumPy ones; the intervals must be the same."""
    from rliable import metrics

    reps = 200 if quick else rl_statistics.REPS
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))  # 5 seeds x 5 tasks

    def rliable_aggregates(m: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(m), metrics.aggregate_mean(m)])

    cases = [
        ("IQM and mean", {"k": x}, rliable_aggregates, rl_statistics.iqm_and_mean),
        (
            "P(X > Y)",
            {"k": [x, y]},
            metrics.probability_of_improvement,
            rl_statistics.probability_of_improvement,
        ),
    ]
    rows = []
    for name, scores, theirs, ours in cases:
        timed = {}
        for func in (theirs, ours):
            start = time.perf_counter()
            timed[func] = (
                rl_statistics._intervals(scores, func, reps)["k"],
                time.perf_counter() - start,
            )
        (slow, slow_s), (fast, fast_s) = timed[theirs], timed[ours]
        same = all(
            abs(a.point - b.point) + abs(a.low - b.low) + abs(a.high - b.high) < 1e-9
            for a, b in zip(slow, fast)
        )
        rows.append([name, f"{slow_s:.2f}", f"{fast_s:.2f}", f"{slow_s / fast_s:.0f}x", same])
    return table(
        [
            f"interval, {reps} replicates, 5 runs x 5 tasks",
            "rliable's metrics, s",
            "NumPy metrics, s",
            "speed-up",
            "same interval",
        ],
        rows,
    )


def machine() -> str:
    return (
        f"{processor_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"d3rlpy {d3rlpy.__version__}, Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; writes nothing")
    parser.add_argument("--out", default=str(HERE / "README.md"))
    parser.add_argument(
        "--only",
        nargs="+",
        type=int,
        help="section numbers to rerun; they replace their sections in --out, the rest stays",
    )
    args = parser.parse_args()
    d3rlpy.seed(0)
    transformers.utils.logging.disable_progress_bar()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    dataset = hopper_dataset(episodes=8 if args.quick else 40, steps=100)
    sections = [
        (
            "1. TD3+BC update time",
            update_time,
            "Same Hopper dataset and batches for every row; LM = all-MiniLM-L6-v2. The goal for "
            "frozen cached is <= 1.3x the plain MLP update.",
        ),
        (
            "2. Precompute throughput",
            precompute_throughput,
            "Frozen MiniLM features of Hopper observations. Plain HF: batches of 256 in dataset "
            "order, padded to the longest, mean pooling. lmencoders: exact dedup, length-sorted "
            "batches of 16 (faster than 256 on CPU), inference mode. Features must match "
            "(<= 1e-4). Goal >= 2x. The last two rows: the same pass through "
            "`precompute_features` into a cache folder, as one file, or in the resumable parts "
            "a long precompute is saved in as it goes (a killed one goes on from its last part).",
        ),
        (
            "3. LM passes, copies and checkpoint size",
            memory_and_checkpoints,
            "TD3+BC (6 encoders), batch 8. Goal for frozen: checkpoint <= 5 MB.",
        ),
        ("4. Action latency at evaluation (batch 1)", action_latency, ""),
        (
            "5. Growth with observation and dataset size",
            growth,
            "Tokenising: `tokenize_texts` (chunks cut between segments, never truncated) against "
            "one Hugging Face tokenizer call on the same whole texts, which chunks nothing. A "
            "long text is packed by its segments' token counts read off that call's offsets; "
            "until 2026-11-28 each of its segments was tokenised again alone: on 500 FinRL texts "
            "(medians of 5, same machine) 4,486 us / obs then, 2,208 now (2.0x).",
        ),
        (
            "6. Evaluation episodes",
            evaluation_time,
            "A frozen-LM TD3+BC policy (untrained, so episodes end at different steps) over 5 "
            "seeded Hopper-v5 episodes: one after another (one LM pass per step of each "
            "episode) against `lmencoders.envs.episode_returns`, which steps them in lockstep "
            "(one LM pass per step for all live episodes).",
        ),
        (
            "7. Per-piece features (pooling=segments)",
            piece_features,
            "The frozen LM's token states pooled per piece of the description (a dimension, or a "
            "FinRL ticker group) and read by a trained attention readout, against mean pooling "
            "over the whole text; same data and batches. Goals: update <= 2x the mean-pooled "
            "update, precompute no slower.",
        ),
        (
            "8. Host work of a tuned LM pass",
            host_work,
            "Tuned encoders (ln_embed, lora, full) render and tokenise their batch before every "
            "LM pass, 6.5 passes per TD3+BC update; on an H100 this host work, not the LM, "
            "bounds the update (benchmarks/gpu.md). Dataset observations repeat, so both are "
            "cached: segments by quantised observation, token ids by text.",
        ),
        (
            "9. Mini-batch sampling",
            sampling,
            "d3rlpy picks a batch's transitions one by one in Python; `lmencoders.flat_sampling` "
            "(used by `lmencoders train` and `experiment`) lays an offline dataset out once and "
            "gathers each batch from the same random draws, so training is unchanged. Medians "
            "over 50 repeats.",
        ),
        (
            "10. Run checkpoints",
            run_checkpoints,
            "A run writes `checkpoint.pt` after every epoch (weights, optimiser states, random "
            "generators) so that a killed run goes on from there; what one write costs against "
            "the updates of an epoch (the evidence grid's epochs are 10,000 steps).",
        ),
        (
            "11. LM precision on this CPU",
            cpu_precision,
            '`precision="bfloat16"` runs the LM\'s forward under autocast. On an H100 it was '
            "slower than float32 for MiniLM (benchmarks/gpu.md); on a CPU it depends on whether "
            "the CPU has bfloat16 instructions. Features stay float32 either way, and a "
            "bfloat16 table is cached apart from the float32 one.",
        ),
        (
            "12. Baseline updates",
            baseline_updates,
            "The vector baselines that sample actions per state, against TD3+BC; the mean over "
            "60 updates. The evidence grid runs BCQ-10 on CPU (`--action-samples 10`, grid "
            "method BCQ-10) and d3rlpy's BCQ only on a lent GPU.",
        ),
        (
            "13. Report statistics",
            report_statistics,
            "`lmencoders report` draws 5,000 stratified-bootstrap replicates (rliable) per "
            "interval, dozens of intervals for the grid. rliable's metrics call scipy's "
            "`trim_mean` / `mannwhitneyu` per replicate; `lmencoders.statistics` computes the same "
            "numbers in NumPy inside the same bootstrap.",
        ),
    ]
    parts = []
    for title, fn, note in sections:
        if args.only and int(title.split(".")[0]) not in args.only:
            parts.append(None)
            continue
        start = time.perf_counter()
        body = fn(dataset, args.quick)
        if args.only:  # the header's machine line is the full run's
            body = f"Rerun alone on: {machine()}.\n\n{body}"
        text = f"## {title}\n\n{note}\n\n{body}\n" if note else f"## {title}\n\n{body}\n"
        print(text, f"({time.perf_counter() - start:.0f} s)\n", flush=True)
        parts.append(text)
    if args.quick:
        return
    when = datetime.date.today().isoformat()
    if args.only:
        sections_rerun = ", ".join(map(str, args.only))
        noun = "sections" if len(args.only) > 1 else "section"
        when = f"{when} ({noun} {sections_rerun}; the others by an earlier full run)"
    machine_line = f"Machine: {machine()}."
    if args.only:  # the sections not rerun were measured on the machine of the full run
        found = re.search(r"^Machine: .*$", Path(args.out).read_text(), re.MULTILINE)
        machine_line = found.group(0) if found else machine_line
    header = (
        "# Benchmarks\n\n"
        f"Generated by `python benchmarks/run.py` (do not edit by hand) on {when}.\n\n"
        f"{machine_line}\n\n"
        f"Data: {dataset.transition_count} real Hopper-v5 transitions (NeoRL layout) of a noisy "
        "gait; FinRL observations from NeoRL's market file. Timings are medians or means of "
        "this one run; compare ratios, not absolute numbers, across machines.\n\n"
    )
    if args.only:  # keep the sections that were not rerun, as they were
        old = Path(args.out).read_text().split("\n## ")[1:]
        kept = {section.split(".")[0]: f"## {section}" for section in old}
        parts = [part or kept[str(i + 1)] for i, part in enumerate(parts)]
    Path(args.out).write_text(header + "\n".join(parts))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
