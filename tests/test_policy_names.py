"""The wire's policy names: one table, derived from the proto enum, equal to the core's policies."""

from __future__ import annotations

import pytest

from lens_serve.core.policies import POLICIES
from lens_serve.policy_names import POLICY_NAMES, POLICY_VALUES, policy_value
from lens_serve.v1 import lens_serve_pb2 as pb


def test_wire_names_are_the_core_policies_in_enum_order() -> None:
    named = [POLICY_NAMES[value] for value in sorted(POLICY_NAMES) if value]
    assert tuple(named) == POLICIES
    assert POLICY_VALUES[""] == pb.POLICY_UNSPECIFIED


@pytest.mark.parametrize(
    ("name", "value"),
    [("lens", pb.POLICY_LENS), ("recency", pb.POLICY_RECENCY), ("UNIFORM", pb.POLICY_UNIFORM),
     ("random", pb.POLICY_RANDOM), ("full", pb.POLICY_FULL), ("POLICY_FULL", pb.POLICY_FULL),
     ("retrieval", pb.POLICY_RETRIEVAL), (" Recency ", pb.POLICY_RECENCY),
     ("", pb.POLICY_UNSPECIFIED), (6, pb.POLICY_RETRIEVAL)],
)  # fmt: skip
def test_policy_value_accepts_names_and_enum_values(name: str | int, value: int) -> None:
    assert policy_value(name) == value


def test_policy_value_refuses_unknown_names_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"^policy: unknown policy 'smart'"):
        policy_value("smart")
    with pytest.raises(ValueError, match=r"^policy: unknown Policy value 99"):
        policy_value(99)
