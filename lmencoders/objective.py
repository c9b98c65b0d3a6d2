"""A user's objective in words, and the prompt that asks a judge whether an outcome meets it.

As in Kwon et al., "Reward Design with Language Models" (ICLR 2023): the prompt holds a task
description, the objective (in words, with optional labelled examples: few-shot), the outcome
written as text, and a question; a parser turns the judge's answer into a reward through a
table (``yes -> 1``, ``no -> 0`` by default). An objective is a YAML file or, zero-shot, just
its sentence::

    task: A one-legged robot hops forward along the x axis.
    objective: The hopper ends at least 6.5 m ahead of where it started.
    examples:                    # optional: dataset trajectories or inline outcome texts
      - {trajectory: 3, label: "yes"}
      - {text: "Start: x position: 0.0 m ... End: x position: 0.2 m ...", label: "no"}
    answers: {"yes": 1.0, "no": 0.0}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

__all__ = [
    "Example",
    "Objective",
    "ObjectiveError",
    "load_objective",
    "build_prompt",
    "parse_answer",
]

DEFAULT_QUESTION = "Does the outcome satisfy the objective?"


class ObjectiveError(ConfigError):
    """An objective file is malformed: the file, field and value are named."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _yaml_word(value: Any) -> Any:
    """YAML 1.1 reads an unquoted yes / no as a boolean: take it back as the word."""
    return {True: "yes", False: "no"}[value] if isinstance(value, bool) else value


class Example(_Strict):
    """A labelled outcome: a trajectory of the dataset being relabelled, or a written one."""

    label: str
    trajectory: int | None = Field(default=None, ge=0)
    text: str | None = None

    @field_validator("label", mode="before")
    @classmethod
    def _label_word(cls, value: Any) -> Any:
        return _yaml_word(value)

    @model_validator(mode="after")
    def _one_source(self) -> Example:
        if (self.trajectory is None) == (self.text is None):
            raise ValueError("give exactly one of 'trajectory' (an index) or 'text'")
        if self.text is not None and not self.text.strip():
            raise ValueError("'text' is empty")
        return self


class Objective(_Strict):
    """What the judge is asked; ``answers`` maps each answer word to its reward."""

    objective: str
    task: str = ""
    question: str = DEFAULT_QUESTION
    examples: tuple[Example, ...] = ()
    answers: dict[str, float] = Field(default_factory=lambda: {"yes": 1.0, "no": 0.0})

    @field_validator("objective", "question")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("answers", mode="before")
    @classmethod
    def _answer_keys(cls, value: Any) -> Any:
        return {_yaml_word(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("answers")
    @classmethod
    def _answer_words(cls, value: dict[str, float]) -> dict[str, float]:
        if len(value) < 2:
            raise ValueError(f"needs at least two answer words, got {list(value)}")
        for word in value:
            if not re.fullmatch(r"[a-z]+", word):
                raise ValueError(f"answer {word!r} must be one lowercase word (a-z)")
        return value

    @model_validator(mode="after")
    def _labels_are_answers(self) -> Objective:
        for i, example in enumerate(self.examples):
            if example.label not in self.answers:
                raise ValueError(
                    f"examples[{i}].label {example.label!r} is not an answer {list(self.answers)}"
                )
        return self


def _validation_message(source: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "<top level>"
        value = error.get("input")
        problems.append(f"field '{field}' = {value!r}: {error['msg']}")
    return f"{source}: " + "; ".join(problems)


def objective_from_mapping(data: Any, source: str = "<inline>") -> Objective:
    if not isinstance(data, Mapping):
        raise ObjectiveError(f"{source}: an objective must be a mapping, got {type(data).__name__}")
    try:
        return Objective.model_validate(dict(data))
    except ValidationError as exc:
        raise ObjectiveError(_validation_message(source, exc)) from None


def load_objective(source: str | Path | Mapping[str, Any] | Objective) -> Objective:
    """An :class:`Objective` from a YAML file, a mapping, or (zero-shot) its sentence."""
    if isinstance(source, Objective):
        return source
    if isinstance(source, Mapping):
        return objective_from_mapping(source)
    path = Path(source)
    looks_like_file = str(source).endswith((".yaml", ".yml"))
    if looks_like_file and not path.is_file():
        raise ObjectiveError(f"{path}: no such objective file")
    if not looks_like_file:
        return objective_from_mapping({"objective": str(source)}, "<--objective text>")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ObjectiveError(f"{path}: not valid YAML ({exc})") from None
    return objective_from_mapping(data, str(path))


def _answer_instruction(answers: Sequence[str]) -> str:
    words = list(answers)
    return "Answer " + ", ".join(words[:-1]) + " or " + words[-1] + "."


def build_prompt(objective: Objective, outcome: str, examples: Sequence[tuple[str, str]]) -> str:
    """The judge's prompt: task, objective, labelled ``(outcome, label)`` examples, the
    outcome, and the question with the answer words to choose from."""
    parts = []
    if objective.task:
        parts.append(objective.task)
    parts.append(f"Objective: {objective.objective}")
    for i, (text, label) in enumerate(examples, 1):
        parts.append(f"Example {i}:\n{text}\n{objective.question} {label.capitalize()}")
    parts.append(f"Outcome:\n{outcome}")
    parts.append(f"{objective.question} {_answer_instruction(list(objective.answers))}")
    return "\n\n".join(parts)


_WORD = re.compile(r"[a-z]+")


def parse_answer(text: str, answers: Mapping[str, float]) -> str | None:
    """The answer word a reply gives, or ``None`` when it gives none or several: its first
    word if that is an answer ("Yes.", "**no**"), else the only answer word it contains."""
    words = _WORD.findall(text.lower())
    if not words:
        return None
    if words[0] in answers:
        return words[0]
    found = {w for w in words if w in answers}
    return found.pop() if len(found) == 1 else None
