"""Plan: validation, the k=v string, JSON round trips. Pure: no processes."""

from __future__ import annotations

import json

import pytest

from meshwise import Plan
from meshwise.plan import resolve_plan


def test_defaults_and_world_size() -> None:
    assert Plan() == Plan(dp=1, pp=1, tp=1, zero=0, microbatches=None, schedule="1f1b", checkpointing=False,
                          precision="fp32")
    # unset micro-batches resolve to 1 without a pipeline, 2 per stage with one
    assert Plan(dp=2).resolved().microbatches == 1 and Plan(pp=4).resolved().microbatches == 8
    assert Plan(pp=4, microbatches=3).resolved().microbatches == 3
    assert Plan(dp=2, pp=3, tp=4).world_size == 24


@pytest.mark.parametrize("spec", [
    "dp=1", "dp=2,pp=2,microbatches=4", "dp=2,tp=2,zero=3,precision=bf16",
    "pp=4,schedule=interleaved,checkpointing=true", "dp=8,schedule=gpipe",
])
def test_str_parses_back_to_an_equal_plan(spec: str) -> None:
    plan = Plan.parse(spec)
    assert Plan.parse(str(plan)) == plan
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_parse_ignores_spaces_and_order() -> None:
    assert Plan.parse(" microbatches=4 , dp=2 ") == Plan(dp=2, microbatches=4)
    assert Plan.parse("checkpointing=yes") == Plan(checkpointing=True)
    assert str(Plan(microbatches=4, dp=2)) == "dp=2,microbatches=4"


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"dp": 0}, ["dp=0", ">= 1"]),
    ({"pp": -1}, ["pp=-1", ">= 1"]),
    ({"tp": 1.5}, ["tp=1.5", "integer"]),
    ({"microbatches": 0}, ["microbatches=0", ">= 1"]),
    ({"zero": 4}, ["zero=4", "0, 1, 2 or 3"]),
    ({"schedule": "1fb1"}, ["schedule='1fb1'", "gpipe, 1f1b, interleaved", "did you mean '1f1b'"]),
    ({"precision": "bf61"}, ["precision='bf61'", "fp32, bf16"]),
    ({"checkpointing": "yes"}, ["checkpointing='yes'", "true or false"]),
])
def test_invalid_fields_name_field_value_and_rule(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        Plan(**kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(("spec", "words"), [
    ("dp=two", ["dp='two'", "integer"]),
    ("dp", ["'dp'", "key=value"]),
    ("microbatch=4", ["'microbatch'", "unknown", "did you mean 'microbatches'"]),
    ("dp=2,dp=4", ["given twice"]),
    ("checkpointing=maybe", ["true or false"]),
    ("microbatches=0", ["microbatches=0"]),
])
def test_bad_strings_say_what_is_wrong(spec: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        Plan.parse(spec)
    for word in words:
        assert word in str(info.value)


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown fields.*'dpp'"):
        Plan.from_dict({"dpp": 2})


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        Plan().dp = 2  # type: ignore[misc]


def test_resolve_plan() -> None:
    assert resolve_plan(None, 4) == Plan(dp=4)
    assert resolve_plan("dp=2,microbatches=2", 2) == Plan(dp=2, microbatches=2)
    with pytest.raises(ValueError) as info:
        resolve_plan(Plan(dp=4), 2)
    assert "needs 4 processes" in str(info.value) and "has 2" in str(info.value)
