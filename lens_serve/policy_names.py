"""The one policy-name table of the wire: the proto's `Policy` enum, named without its POLICY_
prefix ("lens", "recency", ...; "" is POLICY_UNSPECIFIED, the server's default). The client and
the servicer both convert here; `core.policies.POLICIES` names the same set (a test holds them
equal)."""

from __future__ import annotations

from lens_serve.v1 import lens_serve_pb2 as pb

POLICY_VALUES: dict[str, pb.Policy.ValueType] = {
    ("" if value == pb.POLICY_UNSPECIFIED else name.removeprefix("POLICY_").lower()): value
    for name, value in pb.Policy.items()
}
"""Policy name -> enum value."""
POLICY_NAMES: dict[int, str] = {value: name for name, value in POLICY_VALUES.items()}
"""Enum value -> policy name."""


def policy_value(policy: str | int) -> pb.Policy.ValueType:
    """The Policy enum value of a policy name or of an enum value. Raises ValueError naming
    `policy` for anything else."""
    if isinstance(policy, int):
        if policy not in POLICY_NAMES:
            raise ValueError(f"policy: unknown Policy value {policy}")
        return pb.Policy.ValueType(policy)
    key = policy.strip().lower().removeprefix("policy_")
    if key not in POLICY_VALUES:
        names = ", ".join(repr(name) for name in POLICY_VALUES if name)
        raise ValueError(f"policy: unknown policy {policy!r} (choose from {names})")
    return POLICY_VALUES[key]
