"""Shared fixtures: a tiny BERT built from a config (no download) and real Hopper data."""

from __future__ import annotations

import os
from pathlib import Path

import d3rlpy
import gymnasium as gym
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import models, normalizers, pre_tokenizers, processors


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the slow end-to-end tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def feature_cache_dir(tmp_path_factory):
    """Keep the tests' feature caches out of the user's ~/.cache."""
    path = tmp_path_factory.mktemp("feature-cache")
    previous = os.environ.get("LMENCODERS_CACHE")
    os.environ["LMENCODERS_CACHE"] = str(path)
    yield path
    if previous is None:
        del os.environ["LMENCODERS_CACHE"]
    else:
        os.environ["LMENCODERS_CACHE"] = previous


@pytest.fixture(autouse=True)
def quick_bootstrap(monkeypatch):
    """Report statistics with few bootstrap replications: the same code, seconds not minutes."""
    from lmencoders import statistics

    monkeypatch.setattr(statistics, "REPS", 300)


@pytest.fixture
def lm_texts(monkeypatch) -> list[int]:
    """Texts per LM pass (a spy on LanguageModel.encode_prepared, which every mean-pooled
    pass goes through, that calls through)."""
    from lmencoders.backbone import LanguageModel

    seen: list[int] = []
    original = LanguageModel.encode_prepared

    def counting(self, prepared, *args, **kwargs):
        seen.append(len(prepared.inverse))
        return original(self, prepared, *args, **kwargs)

    monkeypatch.setattr(LanguageModel, "encode_prepared", counting)
    return seen


SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["position", "angle", "velocity", "angular", "thigh", "leg", "foot", "torso", "rad"]


def make_tiny_lm(path: Path, seed: int = 0, window: int = 64) -> Path:
    """Save a 2-layer BERT with a WordPiece tokenizer (characters + a few words) to ``path``."""
    chars = list("0123456789.-:,/abcdefghijklmnopqrstuvwxyz")
    vocab_list = (
        SPECIAL + chars + ["##" + c for c in "0123456789abcdefghijklmnopqrstuvwxyz"] + WORDS
    )
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_list))}
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=window,
    )
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=window,
    )
    transformers.BertModel(config).save_pretrained(path)
    return path


def make_tiny_causal_lm(path: Path, seed: int = 0, window: int = 64) -> Path:
    """:func:`make_tiny_lm`'s tokenizer with a 2-layer GPT-2 saved with its (tied) LM head."""
    make_tiny_lm(path, seed, window)
    torch.manual_seed(seed)
    vocab_size = len(transformers.AutoTokenizer.from_pretrained(path))
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=window
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    return str(make_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny-bert"))


def quiet_fit(algo, dataset, steps: int = 4) -> None:
    """``algo.fit`` for a few steps: one epoch, no progress bar, logs or checkpoints."""
    algo.fit(
        dataset,
        n_steps=steps,
        n_steps_per_epoch=steps,
        show_progress=False,
        save_interval=10**9,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
    )


def hopper_rollouts(episodes: int = 4, steps: int = 30, seed: int = 0):
    """Real Hopper-v5 (NeoRL layout) transitions under a uniform random policy."""
    env = gym.make("Hopper-v5", exclude_current_positions_from_observation=False)
    rng = np.random.default_rng(seed)
    obs, actions, rewards, terminals, timeouts = [], [], [], [], []
    for episode in range(episodes):
        o, _ = env.reset(seed=seed + episode)
        for t in range(steps):
            a = rng.uniform(-1, 1, 3).astype(np.float32)
            next_o, r, terminated, _, _ = env.step(a)
            obs.append(o)
            actions.append(a)
            rewards.append(r)
            terminals.append(terminated)
            timeouts.append(t == steps - 1 and not terminated)
            o = next_o
            if terminated:
                break
    return (
        np.asarray(obs, np.float32),
        np.asarray(actions),
        np.asarray(rewards, np.float32),
        np.asarray(terminals),
        np.asarray(timeouts),
    )


@pytest.fixture(scope="session")
def hopper_dataset() -> d3rlpy.dataset.MDPDataset:
    obs, actions, rewards, terminals, timeouts = hopper_rollouts()
    return d3rlpy.dataset.MDPDataset(
        obs, actions, rewards, terminals, timeouts, action_space=d3rlpy.ActionSpace.CONTINUOUS
    )


def straightforward_features(path: str, texts: list[str], pooling: str = "mean") -> torch.Tensor:
    """Plain Hugging Face: one batch padded to the longest, unsorted, mean over the mask."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def neorl_arrays(trajectories: int, steps: int = 25, seed: int = 0) -> dict[str, np.ndarray]:
    """Real Hopper-v5 (NeoRL layout) rollouts stored as NeoRL stores them."""
    env = gym.make("Hopper-v5", exclude_current_positions_from_observation=False)
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("obs", "next_obs", "action", "reward", "done")}
    starts = []
    for t in range(trajectories):
        obs, _ = env.reset(seed=seed + t)
        starts.append(len(cols["obs"]))
        for _ in range(steps):
            action = rng.uniform(-1, 1, 3).astype(np.float32)
            next_obs, reward, terminated, _, _ = env.step(action)
            for key, value in zip(cols, (obs, next_obs, action, [reward], [terminated])):
                cols[key].append(value)
            obs = next_obs
            if terminated:
                break
    data = {k: np.asarray(v, np.float32) for k, v in cols.items()}
    data["done"] = data["done"].astype(bool)
    data["index"] = np.asarray(starts[1:], np.float32)  # NeoRL drops the leading 0
    return data


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """A small NeoRL-layout Hopper training file: 4 real rollouts of up to 20 steps."""
    path = tmp_path_factory.mktemp("data") / "Hopper-v5-low-4-train.npz"
    np.savez(path, **neorl_arrays(4, steps=20))
    return path


def quick_run(data_file: Path, out: Path, **changes):
    """A few-step TD3+BC run's settings on ``data_file`` (no tensorboard), with ``changes``."""
    from lmencoders.train import TrainConfig

    settings = dict(
        dataset=str(data_file),
        encoder="vector",
        steps=10,
        eval_episodes=1,
        batch_size=16,
        out_dir=str(out),
        tensorboard=False,
    )
    return TrainConfig(**(settings | changes))
