"""Relabel an offline dataset's rewards from an objective written in words.

Each trajectory (or window of ``window`` steps) becomes an outcome text through the state
description; a judge answers whether it satisfies the objective; the answer's reward goes on
the span's last transition (Kwon et al.'s per-trajectory reward). The original rewards are
replaced, added to with a weight, or kept (the judge's rewards are stored beside them in
``judge_reward`` either way). The output is a NeoRL-layout ``.npz`` that ``lmencoders train``
and d3rlpy read, and a JSON record beside it. Verdicts go through the on-disk cache: an
interrupted relabel resumes where it stopped, a repeated one asks the judge nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .cache import default_cache_dir
from .datasets import NeoRLData, parse_neorl_file_name, read_neorl_file, write_neorl_file
from .description import StateDescription, load_description
from .envs import description_for
from .errors import ConfigError, LMEncodersError
from .files import atomic_write
from .judges import Judge, JudgeSettings, Query, graded_reward, make_judge
from .objective import Objective, build_prompt, load_objective, parse_answer
from .options import option
from .outcomes import Span, outcome_texts, trajectory_spans, window_spans
from .verdicts import Verdict, VerdictCache, verdict_key

__all__ = ["RelabelConfig", "RelabelError", "relabel", "judge_spans"]


class RelabelError(LMEncodersError, RuntimeError):
    """Verdicts that cannot become rewards (unparseable answers) under the chosen policy."""


@dataclasses.dataclass(kw_only=True)
class RelabelConfig(JudgeSettings):
    """A relabelling run. Fields are the ``lmencoders relabel`` options."""

    dataset: str = option(help="NeoRL-layout .npz to relabel", positional=True, metavar="DATASET")
    objective: str = option(help="the objective: a YAML file, or its sentence (zero-shot)")
    out: str = option(help="the relabelled .npz to write (a JSON record goes beside it)")
    description: str | None = option(
        None, "shipped description name or YAML path (default: the task's)"
    )
    granularity: str = option(
        "trajectory", "what one verdict judges", choices=("trajectory", "window")
    )
    window: int = option(50, "steps per window (granularity window)")
    rewards: str = option(
        "replace",
        "replace the original rewards, add the judge's times --weight, or keep them",
        choices=("replace", "add", "keep"),
    )
    weight: float = option(1.0, "weight of the judge's reward with --rewards add")
    graded: bool = option(
        False, "reward = expected reward under the judge's answer probabilities (not http)"
    )
    unparseable: str = option(
        "error",
        "a reply with no answer word: stop with an error, reward 0, or keep the original "
        "rewards of its span",
        choices=("error", "zero", "original"),
    )
    ranges: bool = option(True, "outcomes show each dimension's lowest and highest value")
    cache_dir: str | None = option(
        None, "verdict cache folder (default: $LMENCODERS_CACHE or ~/.cache/lmencoders)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if Path(self.out).resolve() == Path(self.dataset).resolve():
            raise ConfigError(f"--out {self.out} is the input dataset: choose another file")
        if not str(self.out).endswith(".npz"):
            raise ConfigError(f"--out {self.out} must end with .npz")
        if self.graded and self.judge == "http":
            raise ConfigError("--graded needs answer probabilities: the http judge has none")


def _spans(config: RelabelConfig, data: NeoRLData) -> list[Span]:
    if config.granularity == "window":
        return window_spans(data, config.window)
    return trajectory_spans(data)


def _examples(
    objective: Objective, description: StateDescription, data: NeoRLData, ranges: bool
) -> list[tuple[str, str]]:
    """``(outcome text, label)`` of every example (trajectories of the dataset as a whole)."""
    spans = trajectory_spans(data)
    examples = []
    for i, example in enumerate(objective.examples):
        if example.trajectory is None:
            examples.append((example.text or "", example.label))
            continue
        if example.trajectory >= len(spans):
            raise ConfigError(
                f"objective examples[{i}].trajectory = {example.trajectory}: {data.source} has "
                f"{len(spans)} trajectories"
            )
        span = spans[example.trajectory]
        examples.append((outcome_texts(description, data, [span], ranges=ranges)[0], example.label))
    return examples


def judge_spans(
    judge: Judge,
    queries: list[Query],
    cache: VerdictCache,
    batch_size: int,
) -> tuple[list[Verdict], int]:
    """Every query's verdict, from the cache where it is there; new ones are cached a batch at
    a time. Returns the verdicts and how many came from the cache."""
    identity = judge.identity()
    keys = [verdict_key(identity, judge.reads(q)) for q in queries]
    known = cache.get(set(keys))
    cached = sum(key in known for key in keys)
    todo = list(dict.fromkeys(key for key in keys if key not in known))
    first_query: dict[str, Query] = {}
    for key, query in zip(keys, queries):
        first_query.setdefault(key, query)
    with tqdm(total=len(todo), desc="verdicts", unit="verdict", disable=not todo) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            verdicts = judge.judge([first_query[key] for key in batch])
            fresh = dict(zip(batch, verdicts))
            cache.put(fresh)
            known.update(fresh)
            bar.update(len(batch))
    return [known[key] for key in keys], cached


def _judge_rewards(
    config: RelabelConfig,
    objective: Objective,
    spans: list[Span],
    verdicts: list[Verdict],
    answers: list[str | None],
    data: NeoRLData,
) -> tuple[np.ndarray, np.ndarray]:
    """Per transition: the judge's reward (on each span's last transition), and where an
    unparsed reply keeps the original rewards (``--unparseable original``)."""
    judge_reward = np.zeros(len(data.obs), dtype=np.float32)
    keep_original = np.zeros(len(data.obs), dtype=bool)
    for span, verdict, answer in zip(spans, verdicts, answers):
        if answer is None:
            keep_original[span.start : span.end] = config.unparseable == "original"
            continue
        graded = graded_reward(verdict, objective.answers) if config.graded else None
        judge_reward[span.end - 1] = objective.answers[answer] if graded is None else graded
    return judge_reward, keep_original


def relabel(config: RelabelConfig, command: str = "") -> dict:
    """Run the relabelling; returns (and writes beside ``config.out``) its record."""
    started = time.perf_counter()
    data = read_neorl_file(config.dataset)
    objective = load_objective(config.objective)
    parsed = parse_neorl_file_name(config.dataset) or {}
    description = load_description(
        config.description or description_for(str(parsed.get("task", "")), data.obs.shape[1])
    )
    description.check_size(data.obs.shape[1])
    spans = _spans(config, data)
    outcomes = outcome_texts(description, data, spans, ranges=config.ranges)
    examples = _examples(objective, description, data, config.ranges)
    queries = [Query(build_prompt(objective, text, examples), text) for text in outcomes]
    judge = make_judge(config, objective, examples)
    if config.graded and not judge.graded:
        raise ConfigError(f"--graded needs answer probabilities: the {config.judge} judge has none")
    cache = VerdictCache(Path(config.cache_dir or default_cache_dir()) / "verdicts.sqlite")
    try:
        verdicts, cached = judge_spans(judge, queries, cache, config.judge_batch_size)
    finally:
        cache.close()
        judge.close()

    answers = [parse_answer(v.answer, objective.answers) for v in verdicts]
    counts = collections.Counter(a if a is not None else "unparseable" for a in answers)
    unparsed = [v.answer for v, a in zip(verdicts, answers) if a is None]
    if unparsed and config.unparseable == "error":
        raise RelabelError(
            f"{len(unparsed)} of {len(verdicts)} replies name no answer of "
            f"{list(objective.answers)} (first: {unparsed[:3]!r}). Change the objective's "
            f"answers, or choose --unparseable zero|original; the verdicts are cached, so a "
            f"rerun asks the judge nothing again"
        )
    judge_reward, keep_original = _judge_rewards(config, objective, spans, verdicts, answers, data)
    original = data.reward.reshape(-1).astype(np.float32)
    if config.rewards == "replace":
        reward = np.where(keep_original, original, judge_reward)
    elif config.rewards == "add":
        reward = original + config.weight * judge_reward
    else:
        reward = original
    relabelled = dataclasses.replace(data, reward=reward[:, None])
    out = write_neorl_file(config.out, relabelled, extra={"judge_reward": judge_reward[:, None]})

    settings = dataclasses.asdict(config)
    record = {
        "command": command,
        "config": settings,  # holds the name of the API key's variable, never the key
        "dataset": str(config.dataset),
        "output": str(out),
        "description": description.name,
        "objective": objective.model_dump(mode="json"),
        "judge": json.loads(judge.identity()),
        "prompt_example": queries[0].prompt if queries else "",
        "spans": len(spans),
        "counts": dict(counts),
        "unparseable_replies": unparsed[:20],
        "verdicts_from_cache": cached,
        "seconds": time.perf_counter() - started,
    }
    record_path = out.with_suffix(".json")
    atomic_write(record_path, lambda f: f.write(json.dumps(record, indent=1).encode()))
    return record
