"""Reward design with LM judges: objectives, prompts, outcomes, the three judges, the verdict
cache and ``relabel`` end to end (Kwon et al., ICLR 2023)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from conftest import neorl_arrays, straightforward_features
from judge_server import JudgeServer
from tokenizers import models, pre_tokenizers

from lmencoders.datasets import read_neorl_file, write_neorl_file
from lmencoders.description import load_description
from lmencoders.errors import ConfigError
from lmencoders.judges import (
    CausalLMJudge,
    HTTPJudge,
    JudgeError,
    Query,
    SimilarityJudge,
    graded_reward,
)
from lmencoders.objective import (
    Objective,
    ObjectiveError,
    build_prompt,
    load_objective,
    parse_answer,
)
from lmencoders.outcomes import outcome_text, trajectory_spans, window_spans
from lmencoders.relabel import RelabelConfig, RelabelError, relabel
from lmencoders.verdicts import Verdict, VerdictCache

TESTS = Path(__file__).parent


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Six real Hopper trajectories of different lengths, in NeoRL's layout."""
    path = tmp_path / "Hopper-v5-low-6-train.npz"
    np.savez(path, **neorl_arrays(6, steps=25))
    return path


def steps_of(prompt: str) -> int:
    return int(prompt.split("Steps: ")[1].split()[0])


LONG = 24  # the fixture's trajectories last 23 to 25 steps


def long_enough(prompt: str) -> str:
    """The stub server's rule: trajectories of LONG steps or more satisfy the objective."""
    return "Yes." if steps_of(prompt) >= LONG else "No, it does not."


# --------------------------------------------------------------------------- objective, prompt


def test_prompt_is_exactly_as_documented():
    objective = Objective(
        task="A hopper hops.", objective="It ends ahead.", answers={"yes": 1.0, "no": 0.0}
    )
    prompt = build_prompt(objective, "Start: x: 0 m\nEnd: x: 2 m", [("Start: x: 0 m", "no")])
    assert prompt == (
        "A hopper hops.\n\n"
        "Objective: It ends ahead.\n\n"
        "Example 1:\nStart: x: 0 m\nDoes the outcome satisfy the objective? No\n\n"
        "Outcome:\nStart: x: 0 m\nEnd: x: 2 m\n\n"
        "Does the outcome satisfy the objective? Answer yes or no."
    )


@pytest.mark.parametrize(
    ("reply", "word"),
    [
        ("Yes.", "yes"),
        ("**No**", "no"),
        ("  yes, it does", "yes"),
        ("I think the answer is no.", "no"),
        ("Well, yes and no", None),
        ("No, no doubt about it", "no"),
        ("Maybe", None),
        ("", None),
    ],
)
def test_parser(reply, word):
    assert parse_answer(reply, {"yes": 1.0, "no": 0.0}) == word


def test_objective_file_errors_name_file_field_and_value(tmp_path):
    path = tmp_path / "objective.yaml"
    path.write_text("objective: ends ahead\nexamples:\n  - {trajectory: 1, label: maybe}\n")
    with pytest.raises(ObjectiveError, match=r"objective.yaml.*'maybe' is not an answer"):
        load_objective(path)
    path.write_text("objective: ends ahead\nexamples:\n  - {trajectory: 1, text: x, label: no}\n")
    with pytest.raises(ObjectiveError, match=r"objective.yaml.*examples.0.*exactly one"):
        load_objective(path)
    path.write_text(
        "objective: ends ahead\nanswers: {yes: 1, no: 0}\nexamples: [{text: a, label: no}]\n"
    )
    assert load_objective(path).examples[0].label == "no"  # YAML's boolean no, taken as the word
    path.write_text("objective: ends ahead\nanswers: {yes: 1}\n")
    with pytest.raises(ObjectiveError, match=r"field 'answers'.*at least two"):
        load_objective(path)
    path.write_text("objective: ends ahead\ncolour: blue\n")
    with pytest.raises(ObjectiveError, match=r"field 'colour'"):
        load_objective(path)
    path.write_text("objective: [unclosed\n")
    with pytest.raises(ObjectiveError, match="not valid YAML"):
        load_objective(path)
    with pytest.raises(ObjectiveError, match="no such objective file"):
        load_objective(tmp_path / "missing.yaml")
    assert load_objective("It ends ahead.").objective == "It ends ahead."


def test_outcome_text_and_spans(dataset):
    description = load_description("hopper")
    data = read_neorl_file(dataset)
    states = np.zeros((3, 12))
    states[:, 0] = [0.0, 2.5, 1.0]
    text = outcome_text(description, states)
    lines = text.split("\n")
    assert [line.split(":")[0] for line in lines] == [
        "Start",
        "End",
        "Change",
        "Lowest",
        "Highest",
        "Steps",
    ]
    assert lines[1].startswith("End: x position: 1.0 m,")
    assert lines[2].startswith("Change: x position: 1.0 m,")
    assert lines[4].startswith("Highest: x position: 2.5 m,")
    assert lines[5] == "Steps: 2"
    spans = trajectory_spans(data)
    assert [(s.start, s.end) for s in spans] == data.trajectory_bounds()
    windows = window_spans(data, 10)
    assert sum(s.end - s.start for s in windows) == len(data.obs)
    assert all(0 < s.end - s.start <= 10 for s in windows)


def test_neorl_file_round_trip(tmp_path, dataset):
    data = read_neorl_file(dataset)
    out = write_neorl_file(tmp_path / "copy.npz", data, extra={"judge_reward": data.reward})
    again = read_neorl_file(out)
    for key in ("obs", "next_obs", "action", "reward", "done", "index"):
        np.testing.assert_array_equal(getattr(again, key), getattr(data, key))
    with np.load(out) as raw:
        assert raw["index"][0] == data.index[1]  # NeoRL's layout: no leading 0


# --------------------------------------------------------------------------- similarity judge


def test_similarity_judge_matches_a_direct_computation(tiny_lm):
    yes = ["x position changes by 5 m", "x position changes by 4 m"]
    no = ["foot angle rad", "leg angle rad"]
    judge = SimilarityJudge({"yes": yes, "no": no}, model=tiny_lm)
    outcomes = ["x position changes by 3 m", "thigh angle rad", "foot velocity"]
    verdicts = judge.judge([Query("ignored", text) for text in outcomes])

    def unit(texts: list[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(straightforward_features(tiny_lm, texts), dim=-1)

    centroids = torch.stack([unit(yes).mean(0), unit(no).mean(0)])
    similarity = unit(outcomes) @ torch.nn.functional.normalize(centroids, dim=-1).T
    expected = torch.softmax(similarity / 0.05, dim=-1)
    for verdict, row in zip(verdicts, expected):
        assert verdict.answer == ("yes" if row[0] > row[1] else "no")
        assert verdict.probabilities["yes"] == pytest.approx(float(row[0]), abs=1e-4)
    assert judge.reads(Query("prompt", "outcome")) == "outcome"


# --------------------------------------------------------------------------- local causal LM


def make_tiny_causal_lm(path: Path) -> Path:
    words = ["[PAD]", "[UNK]", "yes", "Yes", "no", "No", "Answer", ":", "outcome", "Objective"]
    vocab = {w: i for i, w in enumerate(words + [str(i) for i in range(10)])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits()]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[PAD]"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(vocab),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory) -> str:
    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("causal") / "tiny-gpt2"))


def test_causal_lm_judge_scores_answer_tokens_like_a_plain_forward(tiny_causal_lm):
    judge = CausalLMJudge(tiny_causal_lm, ["yes", "no"], batch_size=3)
    prompts = ["Objective : 1 2 3 outcome", "outcome 7", "Objective 4 4 4 4 4 4 4 outcome 9 9"]
    verdicts = judge.judge([Query(p, "") for p in prompts])  # one batch, left-padded
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    yes_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("yes", "Yes")}
    no_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("no", "No")}
    for prompt, verdict in zip(prompts, verdicts):
        ids = tokenizer(prompt + "\nAnswer:", return_tensors="pt")  # one at a time, no padding
        with torch.no_grad():
            p = torch.softmax(model(**ids).logits[0, -1], dim=-1)
        yes, no = float(p[list(yes_ids)].sum()), float(p[list(no_ids)].sum())
        assert verdict.probabilities["yes"] == pytest.approx(yes / (yes + no), abs=1e-5)
        assert verdict.answer == ("yes" if yes > no else "no")
    assert graded_reward(verdicts[0], {"yes": 1.0, "no": 0.0}) == pytest.approx(
        verdicts[0].probabilities["yes"]
    )
    # deterministic, and the identity pins the weights
    assert judge.judge([Query(p, "") for p in prompts]) == verdicts
    assert json.loads(judge.identity())["weights"] == judge.weights_sha256


def test_causal_lm_judge_refuses_answers_that_share_a_first_token(tiny_causal_lm):
    with pytest.raises(ConfigError, match="same token"):
        CausalLMJudge(tiny_causal_lm, ["yes", "maybe", "perhaps"])  # both unknown: [UNK]


def test_causal_lm_judge_uses_the_chat_template_when_there_is_one(tiny_causal_lm, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_causal_lm)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} Answer :{% endfor %}"
    folder = tmp_path / "chat"
    tokenizer.save_pretrained(folder)
    transformers.AutoModelForCausalLM.from_pretrained(tiny_causal_lm).save_pretrained(folder)
    judge = CausalLMJudge(str(folder), ["yes", "no"])
    assert judge.chat and judge._text("outcome 1") == "outcome 1 Answer :"


# --------------------------------------------------------------------------- HTTP judge


def test_http_judge_sends_the_prompt_and_the_key_and_bounds_concurrency(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    with JudgeServer(lambda p: "Yes" if "7" in p else "No") as server:
        server.delay = 0.2
        judge = HTTPJudge(server.url, "judge-model", api_key_env="MY_JUDGE_KEY", concurrency=2)
        verdicts = judge.judge([Query(f"outcome {i}", "") for i in range(6)])
        judge.close()
    assert [v.answer for v in verdicts] == ["No"] * 6
    assert sorted(server.prompts()) == [f"outcome {i}" for i in range(6)]
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == "Bearer sk-secret-123"
    assert first["body"]["model"] == "judge-model" and first["body"]["temperature"] == 0
    assert server.most_in_flight == 2
    assert "sk-secret" not in judge.identity()


def test_http_judge_retries_timeouts_and_server_errors():
    with JudgeServer() as server:
        server.slow_first, server.slow_delay = 1, 2.0
        judge = HTTPJudge(server.url, "m", timeout=0.5, retries=2, backoff=0.01)
        assert judge.judge([Query("p", "")])[0].answer == "Yes."
        assert len(server.requests) == 2
    with JudgeServer() as server:
        server.fail_first, server.fail_status = 2, 503
        judge = HTTPJudge(server.url, "m", retries=2, backoff=0.01)
        assert judge.judge([Query("p", "")])[0].answer == "Yes."
        assert len(server.requests) == 3


def test_http_judge_gives_up_after_bounded_retries(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-456")
    with JudgeServer() as server:
        server.garbage = True
        judge = HTTPJudge(server.url, "m", retries=2, backoff=0.01)
        with pytest.raises(JudgeError, match="after 3 attempt.*not an OpenAI") as error:
            judge.judge([Query("p", "")])
        assert len(server.requests) == 3
        assert "sk-secret" not in str(error.value)
    with JudgeServer() as server:  # an unauthorised request is not retried
        server.fail_first, server.fail_status = 10, 401
        judge = HTTPJudge(server.url, "m", retries=5, backoff=0.01)
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge.judge([Query("p", "")])
        assert len(server.requests) == 1


# --------------------------------------------------------------------------- cache


def test_verdict_cache_round_trip_and_a_broken_file_is_kept_aside(tmp_path):
    cache = VerdictCache(tmp_path / "v.sqlite")
    cache.put({"a": Verdict("Yes", {"yes": 0.9, "no": 0.1}), "b": Verdict("No")})
    cache.close()
    again = VerdictCache(tmp_path / "v.sqlite")
    assert again.get(["a", "b", "c"]) == {
        "a": Verdict("Yes", {"yes": 0.9, "no": 0.1}),
        "b": Verdict("No"),
    }
    again.close()
    broken = tmp_path / "broken.sqlite"
    broken.write_bytes(b"this is not a database" * 100)
    with pytest.warns(UserWarning, match="not a verdict cache"):
        fresh = VerdictCache(broken)
    assert len(fresh) == 0
    assert len(list(tmp_path.glob("broken.sqlite.broken-*"))) == 1


# --------------------------------------------------------------------------- relabel


def relabel_config(dataset: Path, out: Path, url: str, **overrides) -> RelabelConfig:
    settings = {
        "dataset": str(dataset),
        "objective": "The hopper stays up for at least 24 steps.",
        "out": str(out),
        "judge": "http",
        "judge_url": url,
        "judge_model": "m",
        "retries": 0,
        "cache_dir": str(out.parent / "cache"),
    }
    return RelabelConfig(**{**settings, **overrides})


def test_relabel_puts_each_verdict_on_the_last_transition(tmp_path, dataset, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-written")
    data = read_neorl_file(dataset)
    bounds = data.trajectory_bounds()
    expected = np.zeros(len(data.obs), np.float32)
    for a, b in bounds:
        expected[b - 1] = 1.0 if b - a >= LONG else 0.0
    assert 0 < expected.sum() < len(bounds)  # both answers occur
    with JudgeServer(long_enough) as server:
        record = relabel(relabel_config(dataset, tmp_path / "out.npz", server.url))
        asked = len(server.requests)
        again = relabel(relabel_config(dataset, tmp_path / "again.npz", server.url))
        assert len(server.requests) == asked  # every verdict from the cache
    out = read_neorl_file(tmp_path / "out.npz")
    np.testing.assert_array_equal(out.reward[:, 0], expected)
    np.testing.assert_array_equal(out.obs, data.obs)
    assert asked == len(bounds) and again["verdicts_from_cache"] == len(bounds)
    yes = int(expected.sum())
    assert record["counts"] == {"yes": yes, "no": len(bounds) - yes}
    written = (tmp_path / "out.json").read_text()
    assert "sk-never-written" not in written and "OPENAI_API_KEY" in written
    assert json.loads(written)["prompt_example"] in server.prompts()  # sent as recorded


def test_relabel_adds_or_keeps_the_original_rewards(tmp_path, dataset):
    data = read_neorl_file(dataset)
    with JudgeServer(long_enough) as server:
        relabel(relabel_config(dataset, tmp_path / "r.npz", server.url))
        relabel(relabel_config(dataset, tmp_path / "a.npz", server.url, rewards="add", weight=2))
        relabel(relabel_config(dataset, tmp_path / "k.npz", server.url, rewards="keep"))
    judged = read_neorl_file(tmp_path / "r.npz").reward
    np.testing.assert_allclose(read_neorl_file(tmp_path / "a.npz").reward, data.reward + 2 * judged)
    np.testing.assert_array_equal(read_neorl_file(tmp_path / "k.npz").reward, data.reward)
    with np.load(tmp_path / "k.npz") as kept:
        np.testing.assert_array_equal(kept["judge_reward"], judged)


def test_relabel_never_reads_an_unparseable_reply_as_zero(tmp_path, dataset):
    data = read_neorl_file(dataset)
    with JudgeServer(lambda p: "Yes" if steps_of(p) >= LONG else "Perhaps") as server:
        with pytest.raises(RelabelError, match=r"name no answer.*'Perhaps'.*--unparseable"):
            relabel(relabel_config(dataset, tmp_path / "e.npz", server.url))
        assert not (tmp_path / "e.npz").exists()
        asked = len(server.requests)
        record = relabel(
            relabel_config(dataset, tmp_path / "o.npz", server.url, unparseable="original")
        )
        assert len(server.requests) == asked  # the failed run's verdicts were cached
    assert record["counts"]["unparseable"] > 0 and record["unparseable_replies"][0] == "Perhaps"
    out = read_neorl_file(tmp_path / "o.npz").reward[:, 0]
    for a, b in data.trajectory_bounds():
        if b - a < LONG:  # unparsed: the span keeps its original rewards
            np.testing.assert_array_equal(out[a:b], data.reward[a:b, 0])
        else:
            assert out[b - 1] == 1.0 and not out[a : b - 1].any()


def test_relabel_windows_and_few_shot_examples(tmp_path, dataset):
    objective = tmp_path / "objective.yaml"
    objective.write_text(
        "task: A hopper.\nobjective: It stays up.\nexamples:\n"
        "  - {trajectory: 0, label: 'yes'}\n  - {text: 'Steps: 1', label: 'no'}\n"
    )
    with JudgeServer(lambda p: "yes") as server:
        record = relabel(
            relabel_config(
                dataset,
                tmp_path / "w.npz",
                server.url,
                objective=str(objective),
                granularity="window",
                window=5,
            )
        )
        prompt = server.prompts()[0]
    data = read_neorl_file(dataset)
    assert record["spans"] == len(window_spans(data, 5))
    assert prompt.startswith("A hopper.\n\nObjective: It stays up.\n\nExample 1:\nStart:")
    assert "Example 2:\nSteps: 1\nDoes the outcome satisfy the objective? No" in prompt
    reward = read_neorl_file(tmp_path / "w.npz").reward[:, 0]
    assert reward.sum() == record["spans"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: x\nexamples:\n  - {trajectory: 99, label: 'yes'}\n")
    with pytest.raises(ConfigError, match=r"examples\[0\].trajectory = 99.*6 trajectories"):
        relabel(
            relabel_config(dataset, tmp_path / "x.npz", "http://127.0.0.1:9", objective=str(bad))
        )


def test_relabel_settings_are_checked_before_any_work(tmp_path, dataset):
    with pytest.raises(ConfigError, match="is the input dataset"):
        relabel_config(dataset, dataset, "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="needs --judge-url"):
        RelabelConfig(
            dataset=str(dataset), objective="x", out=str(tmp_path / "o.npz"), judge="http"
        )
    with pytest.raises(ConfigError, match="--graded needs answer probabilities"):
        relabel_config(dataset, tmp_path / "o.npz", "http://127.0.0.1:9", graded=True)
    out, url = tmp_path / "o.npz", "http://127.0.0.1:9"
    for field, value, message in [
        ("window", 0, "window must be >= 1"),
        ("retries", -1, "retries"),
        ("timeout", 0.0, "timeout must be > 0"),
        ("concurrency", 0, "concurrency"),
        ("judge_batch_size", 0, "judge_batch_size"),
    ]:
        with pytest.raises(ConfigError, match=message):
            relabel_config(dataset, out, url, **{field: value})
    with pytest.raises(ConfigError, match="must end with .npz"):
        relabel_config(dataset, tmp_path / "o.csv", url)


def test_an_interrupted_relabel_resumes_without_asking_again(tmp_path, dataset):
    """A relabel killed mid-run (SIGKILL, nothing to clean up) keeps its finished verdicts:
    the rerun asks only what was not answered, at most the batch in flight twice."""
    many = tmp_path / "Hopper-v5-low-20-train.npz"
    np.savez(many, **neorl_arrays(20, steps=20, seed=3))
    command = [
        sys.executable, "-m", "lmencoders", "relabel", str(many), "--objective", "stays up",
        "--judge", "http", "--judge-model", "m", "--judge-batch-size", "1",
        "--concurrency", "1", "--out", str(tmp_path / "out.npz"),
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    with JudgeServer(long_enough) as server:
        server.delay = 0.3
        env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
        process = subprocess.Popen(
            [*command, "--judge-url", server.url], env=env, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while len(server.requests) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        first_run = len(server.requests)
        assert 6 <= first_run < 20 and not (tmp_path / "out.npz").exists()
        server.delay = 0.0
        config = relabel_config(
            many, tmp_path / "out.npz", server.url, objective="stays up", judge_batch_size=1
        )
        record = relabel(config)
    assert record["verdicts_from_cache"] >= first_run - 1
    assert len(set(server.prompts())) == 20  # every trajectory asked ...
    assert len(server.requests) <= 20 + 1  # ... once, but the one in flight at the kill


@pytest.mark.slow
def test_relabel_command_with_the_shipped_minilm_similarity_judge(tmp_path):
    """From a fresh clone: the shipped data, the shipped MiniLM, no server, no download."""
    from lmencoders.cli import main
    from lmencoders.datasets import shipped_dataset

    out = tmp_path / "relabelled.npz"
    objective = tmp_path / "objective.yaml"
    objective.write_text(
        "task: A one-legged robot hops forward along the x axis.\n"
        "objective: The hopper ends at least 6.5 m ahead of where it started.\n"
        "examples:\n  - {trajectory: 0, label: 'yes'}\n  - {trajectory: 1, label: 'no'}\n"
    )
    code = main(
        ["relabel", str(shipped_dataset()), "--objective", str(objective), "--out", str(out)]
    )
    assert code == 0
    record = json.loads(out.with_suffix(".json").read_text())
    data = read_neorl_file(shipped_dataset())
    assert record["spans"] == data.num_trajectories == sum(record["counts"].values())
    relabelled = read_neorl_file(out)
    ends = [b - 1 for _, b in data.trajectory_bounds()]
    assert set(np.flatnonzero(relabelled.reward[:, 0])) <= set(ends)
