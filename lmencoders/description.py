"""State descriptions: YAML that says how an observation vector reads as text.

A description lists every observation dimension in order (label, unit) and how numbers are
written. Dimensions may be gathered into groups (FinRL's per-ticker blocks), which are written
as one piece of text. Text pieces ("segments") appear in the order of their first dimension and
are the only places where a text longer than the LM's window may be cut.
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import DescriptionError, ObservationError
from .numbers import NAN_CODE, NEGINF_CODE, POSINF_CODE, quantize, render

__all__ = [
    "StateDescription",
    "load_description",
    "shipped_descriptions",
    "DescriptionSchema",
]


# --------------------------------------------------------------------------- schema


def _check_template(template: str, allowed: set[str], required: set[str]) -> str:
    """Placeholders only, by name: no conversion (``!r``) and no format spec (``:>9``).

    Values arrive already written (decimals decide their precision), so a spec could only
    pad or break them; ``{label!r:>99999999}`` would write 100 million characters."""
    try:
        fields = [f for f in string.Formatter().parse(template) if f[1] is not None]
    except ValueError as exc:
        raise ValueError(f"malformed template {template!r}: {exc}") from None
    for _, name, spec, conversion in fields:
        if conversion is not None or spec:
            written = "{" + name + (f"!{conversion}" if conversion else "")
            written += (f":{spec}" if spec else "") + "}"
            raise ValueError(
                f"template {template!r}: placeholder {written} has a "
                f"{'conversion' if conversion else 'format spec'}; write {{{name}}} alone "
                f"(number precision is set by 'decimals')"
            )
    names = {name for _, name, _, _ in fields}
    unknown = names - allowed
    if unknown:
        raise ValueError(
            f"template {template!r} uses unknown placeholder(s) {sorted(unknown)}; "
            f"allowed: {sorted(allowed)}"
        )
    missing = required - names
    if missing:
        raise ValueError(
            f"template {template!r} must contain {sorted('{' + m + '}' for m in missing)}"
        )
    return template


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FormatSchema(_Strict):
    """How one dimension is written, and how pieces are joined."""

    template: str = "{label}: {value} {unit}"
    separator: str = ", "
    decimals: int = Field(5, ge=0, le=12)
    nonfinite: Literal["error", "token"] = "error"
    nan_token: str = Field("nan", min_length=1)
    inf_token: str = Field("inf", min_length=1)

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        return _check_template(value, {"label", "value", "unit"}, {"value"})


class DimensionSchema(_Strict):
    label: str = Field(min_length=1)
    unit: str = ""
    decimals: int | None = Field(None, ge=0, le=12)
    template: str | None = None

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return (
            None if value is None else _check_template(value, {"label", "value", "unit"}, {"value"})
        )


class GroupSchema(_Strict):
    label: str = Field(min_length=1)
    dimensions: list[int] = Field(min_length=1)


class GroupsSchema(_Strict):
    template: str = "{label}: {values}"
    member_template: str = "{value}"
    value_separator: str = " "
    items: list[GroupSchema] = Field(min_length=1)

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        return _check_template(value, {"label", "values"}, {"values"})

    @field_validator("member_template")
    @classmethod
    def _member_template(cls, value: str) -> str:
        return _check_template(value, {"label", "value", "unit"}, {"value"})


class DescriptionSchema(_Strict):
    """The YAML file, validated. See README "Writing a description"."""

    name: str = Field(min_length=1)
    summary: str = ""
    format: FormatSchema = FormatSchema()
    dimensions: list[DimensionSchema] = Field(min_length=1)
    groups: GroupsSchema | None = None


# --------------------------------------------------------------------------- rendering


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


SEGMENT_CACHE = 100_000  # observations whose segments a description keeps (~1 kB each)
# fingerprint -> {observation codes: segments}: one cache per description content, however
# many description objects (one per encoder) share it
_SEGMENT_CACHES: dict[str, dict[bytes, list[str]]] = {}


class StateDescription:
    """A validated description that turns observation batches (N, D) into N strings."""

    def __init__(self, schema: DescriptionSchema, source: str = "<inline>") -> None:
        self.schema = schema
        self.source = source
        self.size = len(schema.dimensions)
        fmt = schema.format
        self.labels = [d.label for d in schema.dimensions]
        self.decimals = np.array(
            [fmt.decimals if d.decimals is None else d.decimals for d in schema.dimensions],
            dtype=np.int64,
        )
        self.separator = fmt.separator
        # Each segment: a format string with positional slots, and the dimensions filling them.
        self._segments: list[tuple[str, list[int]]] = self._plan_segments()
        self._text_format = _escape(self.separator).join(f for f, _ in self._segments)
        self._text_slots = [d for _, dims in self._segments for d in dims]

    # -- construction helpers ------------------------------------------------------------

    def _dimension_format(self, index: int, template: str) -> str:
        dim = self.schema.dimensions[index]
        return template.format(
            label=_escape(dim.label), unit=_escape(dim.unit), value="{}"
        ).rstrip()

    def _group_of_dimension(self) -> dict[int, int]:
        """Dimension index -> index of the group holding it (each dimension in at most one)."""
        owner: dict[int, int] = {}
        items = self.schema.groups.items if self.schema.groups else []
        for g, group in enumerate(items):
            field = f"groups.items[{g}].dimensions"
            for dim in group.dimensions:
                if not 0 <= dim < self.size:
                    last = self.size - 1
                    raise self._error(
                        field, dim, f"out of range 0..{last} of {self.size} dimensions"
                    )
                if dim in owner:
                    holder = items[owner[dim]].label
                    raise self._error(field, dim, f"dimension {dim} is already in group {holder!r}")
                owner[dim] = g
        return owner

    def _plan_segments(self) -> list[tuple[str, list[int]]]:
        groups = self.schema.groups
        owner = self._group_of_dimension()
        segments: list[tuple[int, str, list[int]]] = []
        for index, dim in enumerate(self.schema.dimensions):
            if index not in owner:
                template = dim.template or self.schema.format.template
                segments.append((index, self._dimension_format(index, template), [index]))
        if groups is not None:
            for group in groups.items:
                members = _escape(groups.value_separator).join(
                    self._dimension_format(d, groups.member_template) for d in group.dimensions
                )
                text = groups.template.format(label=_escape(group.label), values=members)
                segments.append((min(group.dimensions), text, list(group.dimensions)))
        segments.sort(key=lambda s: s[0])
        return [(text, dims) for _, text, dims in segments]

    def _error(self, field: str, value: Any, problem: str) -> DescriptionError:
        return DescriptionError(f"{self.source}: field '{field}' = {value!r}: {problem}")

    # -- public API -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.schema.name

    @property
    def num_segments(self) -> int:
        """Pieces of text per observation: single dimensions and groups."""
        return len(self._segments)

    @property
    def segment_labels(self) -> list[str]:
        """A label per piece, in text order: the dimension's label or the group's."""
        owner = self._group_of_dimension()
        items = self.schema.groups.items if self.schema.groups else []
        return [
            items[owner[dims[0]]].label if dims[0] in owner else self.labels[dims[0]]
            for _, dims in self._segments
        ]

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the validated content: equal fingerprints write equal texts."""
        canonical = json.dumps(self.schema.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(
            self.schema.model_dump(mode="json", exclude_defaults=True), sort_keys=False
        )

    def check_size(self, size: int) -> None:
        """Raise unless observations have exactly this description's number of dimensions."""
        if size == self.size:
            return
        matching = [name for name, d in _shipped_sizes().items() if d == size]
        hint = f" Shipped descriptions with {size} dimensions: {matching}." if matching else ""
        raise DescriptionError(
            f"{self.source}: description {self.name!r} has {self.size} dimensions "
            f"({self.schema.summary or 'see its file'}) but the observations have {size}.{hint}"
        )

    def quantize(self, observations: np.ndarray) -> np.ndarray:
        """Validate a batch (N, D) and return its int64 codes; the text is a function of them."""
        observations = np.asarray(observations)
        if observations.ndim != 2:
            expected = f"(N, {self.size})"
            raise ObservationError(
                f"{self.source}: expected a batch of shape {expected}, got {observations.shape}"
            )
        self.check_size(observations.shape[1])
        try:
            codes = quantize(observations, self.decimals)
        except OverflowError as exc:
            raise ObservationError(f"{self.source}: {exc}") from None
        if self.schema.format.nonfinite == "error":
            bad = ~np.isfinite(observations)
            if bad.any():
                row, col = np.argwhere(bad)[0]
                raise ObservationError(
                    f"{self.source}: observation row {row}, dimension {col} "
                    f"({self.labels[col]!r}) is {float(observations[row, col])!r}; this "
                    f"description rejects NaN/inf (set format.nonfinite: token to write them)"
                )
        return codes

    def _column_strings(self, codes: np.ndarray) -> list[list[str]]:
        fmt = self.schema.format
        special = {
            NAN_CODE: fmt.nan_token,
            POSINF_CODE: fmt.inf_token,
            NEGINF_CODE: "-" + fmt.inf_token,
        }
        columns = []
        for col in range(codes.shape[1]):
            decimals = int(self.decimals[col])
            column = codes[:, col].tolist()
            columns.append([special[c] if c in special else render(c, decimals) for c in column])
        return columns

    def texts_from_codes(self, codes: np.ndarray) -> list[str]:
        columns = self._column_strings(codes)
        slots = [columns[d] for d in self._text_slots]
        return [self._text_format.format(*values) for values in zip(*slots)]

    def segments_from_codes(self, codes: np.ndarray) -> list[list[str]]:
        columns = self._column_strings(codes)
        out: list[list[str]] = [[] for _ in range(codes.shape[0])]
        for fmt, dims in self._segments:
            for row, values in enumerate(zip(*(columns[d] for d in dims))):
                out[row].append(fmt.format(*values))
        return out

    def format(self, observations: np.ndarray) -> list[str]:
        """Turn a batch (N, D) of observations into N strings."""
        return self.texts_from_codes(self.quantize(observations))

    def format_segments(self, observations: np.ndarray) -> list[list[str]]:
        """Like :meth:`format` but keeps the pieces; ``separator.join`` gives the text."""
        return self.segments_from_codes(self.quantize(observations))

    def cached_segments(self, observations: np.ndarray) -> list[list[str]]:
        """:meth:`format_segments`, remembering the segments of up to ``SEGMENT_CACHE``
        observations by their codes. A tuned encoder renders the same dataset observations
        every update: on an H100 that rendering was ~80 ms of a 306 ms ln_embed TD3+BC update
        (profiled). Past the limit the cache starts over."""
        codes = self.quantize(observations)
        keys = [row.tobytes() for row in codes]
        cache = _SEGMENT_CACHES.setdefault(self.fingerprint, {})
        found = [cache.get(k) for k in keys]
        missing = [i for i, segments in enumerate(found) if segments is None]
        if missing:
            if len(cache) + len(missing) > SEGMENT_CACHE:
                cache.clear()
            for i, segments in zip(missing, self.segments_from_codes(codes[missing])):
                found[i] = cache[keys[i]] = segments
        return found  # type: ignore[return-value]

    def sample_texts(self, rows: int = 256, seed: int = 0) -> list[str]:
        """Texts of made-up observations over many magnitudes, plus the non-finite tokens:
        what the description's words look like around numbers (for vocabulary coverage)."""
        rng = np.random.default_rng(seed)
        values = rng.standard_normal((rows, self.size)) * 10.0 ** rng.integers(-4, 5, (rows, 1))
        values = np.concatenate([np.zeros((1, self.size)), values])
        fmt = self.schema.format
        return self.texts_from_codes(quantize(values, self.decimals)) + [
            fmt.nan_token,
            fmt.inf_token,
            "-" + fmt.inf_token,
        ]

    def __repr__(self) -> str:
        return f"StateDescription(name={self.name!r}, size={self.size}, source={self.source!r})"


# --------------------------------------------------------------------------- loading


def _shipped_dir() -> Path:
    try:  # installed: the top-level descriptions/ folder ships as lmencoders.descriptions
        return Path(str(resources.files("lmencoders.descriptions")))
    except ModuleNotFoundError:  # imported straight from a source checkout
        return Path(__file__).resolve().parent.parent / "descriptions"


def shipped_descriptions() -> dict[str, Path]:
    """Names of the descriptions that ship with lmencoders, and their files."""
    return {p.stem: p for p in sorted(_shipped_dir().glob("*.yaml"))}


@functools.cache
def _shipped_sizes() -> dict[str, int]:
    sizes = {}
    for name, path in shipped_descriptions().items():
        data = yaml.safe_load(path.read_text())
        sizes[name] = len(data.get("dimensions", []))
    return sizes


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in err["loc"])
        field = field.replace(".[", "[")
        value = err.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        lines.append(f"  field '{field}' = {shown}: {err['msg']}")
    return f"{source}: invalid state description\n" + "\n".join(lines)


def description_from_mapping(data: Any, source: str = "<inline>") -> StateDescription:
    if not isinstance(data, Mapping):
        raise DescriptionError(
            f"{source}: a description must be a YAML mapping with 'name' and 'dimensions', "
            f"got {type(data).__name__}"
        )
    try:
        schema = DescriptionSchema.model_validate(dict(data))
    except ValidationError as exc:
        raise DescriptionError(_format_validation_error(source, exc)) from None
    return StateDescription(schema, source=source)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise DescriptionError(f"{source}{where}: malformed YAML: {problem}") from None


def load_description(
    source: StateDescription | str | Path | Mapping[str, Any],
) -> StateDescription:
    """Load a description from a shipped name, a YAML file path, inline YAML text or a mapping."""
    if isinstance(source, StateDescription):
        return source
    if isinstance(source, Mapping):
        return description_from_mapping(source)
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source):
        text_source = str(source)
        shipped = shipped_descriptions()
        if isinstance(source, str) and source in shipped:
            path = shipped[source]
        else:
            path = Path(source)
            if not path.is_file():
                raise DescriptionError(
                    f"no shipped description or file named {text_source!r}; "
                    f"shipped: {sorted(shipped)}"
                )
        return description_from_mapping(_parse_yaml(path.read_text(), str(path)), str(path))
    if isinstance(source, str):
        return description_from_mapping(_parse_yaml(source, "<inline>"))
    raise TypeError(f"cannot load a description from {type(source).__name__}")


def as_description_field(source: StateDescription | str | Path | Mapping[str, Any]) -> str:
    """A JSON-able form of a description for configs: a shipped name stays a name, anything
    else becomes inline YAML so a saved model never depends on a file that may change."""
    if isinstance(source, str) and source in shipped_descriptions():
        return source
    return load_description(source).to_yaml()
