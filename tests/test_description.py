from __future__ import annotations

import csv
import re

import gymnasium as gym
import numpy as np
import pytest

import lmencoders
from lmencoders import DescriptionError, ObservationError, load_description
from lmencoders.envs import default_market_file

FINRL_CSV = default_market_file()  # NeoRL's real market file, as shipped with lmencoders

SIZES = {
    "hopper": 12,
    "hopper-v5": 11,
    "walker2d": 18,
    "walker2d-v5": 17,
    "halfcheetah": 18,
    "halfcheetah-v5": 17,
    "finrl": 181,
    "ib": 180,
    "citylearn": 74,
}


def paper_number(value: float) -> str:
    """Independent oracle: Python's decimal formatting, trailing zeros dropped, one kept."""
    text = f"{round(float(value), 5) + 0.0:.5f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def test_every_shipped_description_loads_with_its_size():
    assert {n: load_description(n).size for n in lmencoders.shipped_descriptions()} == SIZES


@pytest.mark.parametrize(
    "value, text",
    [
        (0.0143, "0.0143"),
        (100.0, "100.0"),
        (1e6, "1000000.0"),
        (-0.00287, "-0.00287"),
        (-0.000001, "0.0"),
        (66.666664, "66.66666"),
        (2.795914, "2.79591"),
        (-3.5, "-3.5"),
        (0.0, "0.0"),
    ],
)
def test_numbers_are_written_as_in_the_paper(value, text):
    description = load_description({"name": "one", "dimensions": [{"label": "v"}]})
    assert description.format(np.array([[value]])) == [f"v: {text}"]


@pytest.mark.parametrize(
    "name, env_id, with_x",
    [
        ("hopper", "Hopper-v5", True),
        ("hopper-v5", "Hopper-v5", False),
        ("walker2d", "Walker2d-v5", True),
        ("walker2d-v5", "Walker2d-v5", False),
        ("halfcheetah", "HalfCheetah-v5", True),
        ("halfcheetah-v5", "HalfCheetah-v5", False),
    ],
)
def test_mujoco_descriptions_format_real_observations(name, env_id, with_x):
    env = gym.make(env_id, exclude_current_positions_from_observation=not with_x)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    batch = [obs]
    for _ in range(20):
        obs, *_ = env.step(rng.uniform(-1, 1, env.action_space.shape))
        batch.append(obs)
    batch = np.asarray(batch)
    description = load_description(name)
    texts = description.format(batch)
    assert len(texts) == len(batch)
    for row, text in zip(batch, texts):
        expected = ", ".join(
            f"{d.label}: {paper_number(v)} {d.unit}".rstrip()
            for d, v in zip(description.schema.dimensions, row)
        )
        assert text == expected
    if with_x:
        assert texts[0].startswith("x position: ")


def finrl_first_day() -> tuple[np.ndarray, list[str]]:
    with open(FINRL_CSV) as f:
        rows = [r for r in csv.DictReader(f) if r["date"] == "2019-01-02"]
    columns = [[float(r[c]) for r in rows] for c in ("close",)]
    shares = [0.0] * 30
    indicators = [[float(r[c]) for r in rows] for c in ("macd", "rsi_30", "cci_30", "dx_30")]
    obs = np.array([1e6] + columns[0] + shares + sum(indicators, []))
    return obs, [r["tic"] for r in rows]


def test_finrl_formats_the_real_market_file_as_the_paper_does():
    obs, tickers = finrl_first_day()
    text = load_description("finrl").format(obs[None])[0]
    assert text.startswith("Current balance: 1000000.0, AAPL: 38.56256 0.0 -2.0199 37.86735 ")
    pieces = text.split(", ")
    assert len(pieces) == 31
    for i, (piece, ticker) in enumerate(zip(pieces[1:], tickers)):
        values = [obs[1 + k * 30 + i] for k in range(6)]
        assert piece == f"{ticker}: " + " ".join(paper_number(v) for v in values)


@pytest.mark.parametrize("name, groups", [("ib", 30), ("citylearn", 0)])
def test_long_descriptions_format_every_dimension_once(name, groups):
    description = load_description(name)
    obs = np.arange(description.size, dtype=np.float64)[None] + 0.25
    segments = description.format_segments(obs)[0]
    numbers = re.findall(r"-?\d+\.\d+", description.separator.join(segments))
    assert sorted(float(n) for n in numbers) == sorted(obs[0].tolist())
    assert len(segments) == (groups or description.size)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ndimensions:\n  - label: a\n   unit: [m\n")
    with pytest.raises(
        DescriptionError, match=r"broken\.yaml line \d+, column \d+: malformed YAML"
    ):
        load_description(path)


@pytest.mark.parametrize(
    "patch, field, value",
    [
        ({"dimensions": [{"label": "a"}, {"label": "b", "unit": 5}]}, "dimensions[1].unit", "5"),
        ({"dimensions": [{"lable": "a"}]}, "dimensions[0].lable", "'a'"),
        ({"format": {"template": "{label} = {val}"}}, "format.template", "'{label} = {val}'"),
        ({"format": {"decimals": -1}}, "format.decimals", "-1"),
    ],
)
def test_invalid_fields_are_named_with_their_value(tmp_path, patch, field, value):
    import yaml

    data = {"name": "bad", "dimensions": [{"label": "a"}]} | patch
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DescriptionError) as info:
        load_description(str(path))
    message = str(info.value)
    assert "bad.yaml" in message and f"'{field}' = {value}" in message


@pytest.mark.parametrize("dims, problem", [([0, 5], "out of range"), ([0, 1], "already in group")])
def test_bad_groups_are_rejected(dims, problem):
    data = {
        "name": "g",
        "dimensions": [{"label": "a"}, {"label": "b"}, {"label": "c"}],
        "groups": {
            "items": [{"label": "x", "dimensions": [1]}, {"label": "y", "dimensions": dims}]
        },
    }
    with pytest.raises(DescriptionError, match=rf"groups\.items\[1\]\.dimensions.*{problem}"):
        load_description(data)


def test_size_mismatch_is_an_error_that_suggests_the_other_layout():
    with pytest.raises(DescriptionError, match=r"12 dimensions.*observations have 11.*hopper-v5"):
        load_description("hopper").format(np.zeros((2, 11)))


def test_nonfinite_values_are_rejected_with_row_dimension_and_label():
    obs = np.zeros((3, 12))
    obs[2, 6] = np.nan
    with pytest.raises(ObservationError, match=r"row 2, dimension 6 \('x velocity'\) is nan"):
        load_description("hopper").format(obs)


def test_nonfinite_values_can_be_written_as_tokens():
    description = load_description(
        {
            "name": "t",
            "format": {"nonfinite": "token", "nan_token": "unknown"},
            "dimensions": [{"label": "a"}, {"label": "b"}, {"label": "c"}],
        }
    )
    assert description.format(np.array([[np.nan, np.inf, -np.inf]])) == [
        "a: unknown, b: inf, c: -inf"
    ]


def test_unknown_name_lists_shipped_descriptions():
    with pytest.raises(
        DescriptionError, match=r"no shipped description or file named 'hoper'.*'hopper'"
    ):
        load_description("hoper")


def test_inline_yaml_and_round_trip():
    inline = "name: mine\nformat: {decimals: 2}\ndimensions:\n  - {label: speed, unit: km/h}\n"
    description = load_description(inline)
    assert description.format(np.array([[3.14159]])) == ["speed: 3.14 km/h"]
    again = load_description(description.to_yaml())
    assert again.fingerprint == description.fingerprint


def test_values_too_large_for_the_decimals_are_an_error():
    with pytest.raises(ObservationError, match="too large"):
        load_description("hopper").format(np.full((1, 12), 1e15))


@pytest.mark.parametrize(
    "field, template",
    [
        ("format.template", "{label!r:>99999999}: {value}"),
        ("format.template", "{label}: {value:.2f}"),
        ("dimensions[0].template", "{label}: {value!s}"),
        ("groups.member_template", "{value:>4}"),
        ("groups.template", "{label:^30}: {values}"),
    ],
)
def test_templates_with_a_conversion_or_format_spec_are_refused_at_load(field, template):
    data = {"name": "t", "dimensions": [{"label": "a"}, {"label": "b"}]}
    if field == "format.template":
        data["format"] = {"template": template}
    elif field == "dimensions[0].template":
        data["dimensions"][0]["template"] = template
    else:
        key = field.split(".")[1]
        data["groups"] = {"items": [{"label": "g", "dimensions": [0, 1]}], key: template}
    with pytest.raises(DescriptionError, match=rf"'{re.escape(field)}'.*(conversion|format spec)"):
        load_description(data)


def test_a_finite_value_too_large_to_scale_is_an_error_not_written_as_inf():
    description = load_description(
        {
            "name": "t",
            "format": {"nonfinite": "token", "decimals": 12},
            "dimensions": [{"label": "a"}],
        }
    )
    with pytest.raises(ObservationError, match="too large"):
        description.format(np.array([[1e300]]))
    with pytest.raises(ObservationError, match="too large"):
        description.format(np.array([[-np.finfo(np.float64).max]]))


def test_tokens_are_written_as_configured_and_never_as_internal_codes():
    with pytest.raises(DescriptionError, match="nan_token"):
        load_description({"name": "t", "format": {"nan_token": ""}, "dimensions": [{"label": "a"}]})
    description = load_description(
        {
            "name": "t",
            "format": {"nonfinite": "token", "nan_token": "0", "decimals": 3},
            "dimensions": [{"label": "a"}],
        }
    )
    texts = description.format(np.array([[np.nan], [np.inf], [-np.inf], [0.0]]))
    assert texts == ["a: 0", "a: inf", "a: -inf", "a: 0.0"]
    assert not any("922" in t for t in texts)


def test_rendering_a_sentinel_code_is_refused():
    from lmencoders.numbers import NAN_CODE, POSINF_CODE, render

    for code in (NAN_CODE, POSINF_CODE):
        with pytest.raises(ValueError, match="not the code of a finite value"):
            render(code, 5)


def test_cached_segments_are_the_formatted_segments(monkeypatch):
    import lmencoders.description as description_module

    monkeypatch.setattr(description_module, "_SEGMENT_CACHES", {})
    description = load_description("hopper")
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(6, 12))
    batch[3] = batch[0]  # a repeat within one batch
    for _ in range(2):  # rendered, then from the cache
        assert description.cached_segments(batch) == description.format_segments(batch)
    cache = description_module._SEGMENT_CACHES[description.fingerprint]
    assert len(cache) == 5
    same = load_description("hopper")  # another object with the same content shares it
    assert same is not description and same.cached_segments(
        batch[:2]
    ) == description.format_segments(batch[:2])
    assert list(description_module._SEGMENT_CACHES) == [description.fingerprint]
    monkeypatch.setattr(description_module, "SEGMENT_CACHE", 7)
    more = rng.normal(size=(4, 12))
    assert description.cached_segments(more) == description.format_segments(more)
    assert len(cache) == 4  # over the limit: started over
