"""The wire contract: committed generated code is fresh, and docs/design.md §4 names/numbers/types
hold."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from lens_serve.v1 import lens_serve_pb2

REPO = Path(__file__).resolve().parent.parent
PROTO = "lens_serve/v1/lens_serve.proto"
GENERATED = (
    "lens_serve_pb2.py",
    "lens_serve_pb2.pyi",
    "lens_serve_pb2_grpc.py",
    "lens_serve_pb2_grpc.pyi",
)

_SCALAR_NAMES = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_BYTES: "bytes",
}

# message -> field -> (number, type). "repeated X" for repeated fields; messages and enums by
# their short name. Exactly the docs/design.md §4 minimum fields; messages may carry more.
DESIGN_MESSAGES: dict[str, dict[str, tuple[int, str]]] = {
    "SamplingParams": {
        "max_tokens": (1, "uint32"),
        "temperature": (2, "float"),
        "top_p": (3, "float"),
        "seed": (4, "uint64"),
        "stop": (5, "repeated string"),
    },
    "CreateSessionRequest": {},
    "Session": {"session_id": (1, "string"), "lifetime_tokens": (2, "uint64")},
    "AppendRequest": {
        "session_id": (1, "string"),
        "text": (2, "string"),
        "token_ids": (3, "repeated int32"),
    },
    "AppendResponse": {"session_id": (1, "string"), "lifetime_tokens": (2, "uint64")},
    "GenerateRequest": {
        "session_id": (1, "string"),
        "prompt": (2, "string"),
        "prompt_token_ids": (3, "repeated int32"),
        "sampling": (4, "SamplingParams"),
        "wc_budget": (5, "uint32"),
        "policy": (6, "Policy"),
    },
    "Usage": {
        "lifetime_tokens": (1, "uint64"),
        "wc_rows": (2, "uint32"),
        "gist_covered_tokens": (3, "uint64"),
        "lens_version": (4, "string"),
        "wc_choice_ms": (5, "double"),
        "completion_tokens": (6, "uint32"),
        "cached_rows": (7, "uint32"),
    },
    "GenerateResponse": {
        "text": (1, "string"),
        "token_ids": (2, "repeated int32"),
        "finish_reason": (3, "string"),
        "usage": (4, "Usage"),
    },
    "ScoreRequest": {
        "session_id": (1, "string"),
        "context": (2, "string"),
        "continuation": (3, "string"),
        "wc_budget": (4, "uint32"),
        "policy": (5, "Policy"),
        "query": (8, "string"),
        "query_token_ids": (9, "repeated int32"),
    },
    "ScoreResponse": {
        "mean_nll": (1, "double"),
        "token_nll": (2, "repeated float"),
        "working_context": (3, "WorkingContext"),
    },
    "GetWorkingContextRequest": {
        "session_id": (1, "string"),
        "wc_budget": (2, "uint32"),
        "policy": (3, "Policy"),
        "query": (4, "string"),
        "query_token_ids": (5, "repeated int32"),
    },
    "Span": {
        "start": (1, "uint64"),
        "end": (2, "uint64"),
        "lod": (3, "uint32"),
        "score": (4, "float"),
        "rows": (5, "uint32"),
    },
    "WorkingContext": {
        "spans": (1, "repeated Span"),
        "lens_version": (2, "string"),
        "lifetime_tokens": (3, "uint64"),
    },
    "GetLensStatusRequest": {},
    "LensStatus": {"current_version": (1, "string"), "versions": (2, "repeated string")},
    "SetLensVersionRequest": {"version": (1, "string")},
}

# Records persist in the `lens:prefs` stream, so old records must stay decodable: the whole
# schema of PreferenceRecord and its parts is frozen (add fields, never change these).
RECORD_MESSAGES: dict[str, dict[str, tuple[int, str]]] = {
    "SpanSpec": {"start": (1, "uint64"), "end": (2, "uint64"), "lod": (3, "uint32")},
    "WorkingContextSpec": {"spans": (1, "repeated SpanSpec")},
    "ShadowVariant": {
        "spec": (1, "WorkingContextSpec"),
        "mean_nll": (2, "double"),
        "kind": (3, "string"),
        "log_prob": (4, "double"),
        "edit_probs": (5, "repeated double"),
        "token_nll": (6, "repeated float"),
    },
    "PreferenceRecord": {
        "model": (1, "string"),
        "gistnet_version": (2, "string"),
        "lens_version": (3, "string"),
        "block_size": (4, "uint32"),
        "gist_rows": (5, "uint32"),
        "tail": (6, "uint32"),
        "budget": (7, "uint32"),
        "lifetime_token_ids": (8, "repeated int32"),
        "window_start": (9, "uint64"),
        "target_token_ids": (10, "repeated int32"),
        "variants": (11, "repeated ShadowVariant"),
        "created_at_ms": (12, "int64"),
        "request_id": (13, "string"),
        "seed": (14, "uint64"),
        "session_id": (15, "string"),
        "policy": (16, "Policy"),
    },
}


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        name = field.message_type.name
    elif field.enum_type is not None:
        name = field.enum_type.name
    else:
        name = _SCALAR_NAMES[field.type]
    return f"repeated {name}" if field.is_repeated else name


def _fields(descriptor: Descriptor) -> dict[str, tuple[int, str]]:
    return {f.name: (f.number, _type_name(f)) for f in descriptor.fields}


def _protoc(out_dir: Path) -> None:
    """Runs the `make proto` command with `out_dir` as every output directory."""
    env = dict(os.environ)
    # protoc finds the protoc-gen-mypy / protoc-gen-mypy_grpc plugins on PATH (the venv's bin).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = str(out_dir)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "protos",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            f"protos/{PROTO}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stdout}\n{result.stderr}"


def test_generated_code_matches_proto_when_regenerated(tmp_path: Path) -> None:
    _protoc(tmp_path)
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "lens_serve" / "v1" / name).read_bytes()
        != (REPO / "lens_serve" / "v1" / name).read_bytes()
    ]
    assert not stale, f"stale generated code, run `make proto`: {stale}"


def test_generated_code_requires_protobuf_at_most_pinned_runtime() -> None:
    header = (REPO / "lens_serve" / "v1" / "lens_serve_pb2.py").read_text()
    line = next(x for x in header.splitlines() if x.startswith("# Protobuf Python Version:"))
    generated = tuple(int(p) for p in line.split(":")[1].strip().split("."))
    assert generated <= (7, 36, 2), f"gencode needs protobuf {generated}, the pin is 7.36.2"


@pytest.mark.parametrize("message", sorted(DESIGN_MESSAGES))
def test_message_has_design_fields_when_described(message: str) -> None:
    descriptor = lens_serve_pb2.DESCRIPTOR.message_types_by_name[message]
    actual = _fields(descriptor)
    expected = DESIGN_MESSAGES[message]
    assert {name: actual.get(name) for name in expected} == expected


@pytest.mark.parametrize("message", sorted(RECORD_MESSAGES))
def test_record_schema_is_frozen_when_described(message: str) -> None:
    descriptor = lens_serve_pb2.DESCRIPTOR.message_types_by_name[message]
    actual = _fields(descriptor)
    expected = RECORD_MESSAGES[message]
    assert {name: actual.get(name) for name in expected} == expected


def test_policy_enum_has_design_values_when_described() -> None:
    enum = lens_serve_pb2.DESCRIPTOR.enum_types_by_name["Policy"]
    assert {v.name: v.number for v in enum.values} == {
        "POLICY_UNSPECIFIED": 0,
        "POLICY_LENS": 1,
        "POLICY_RECENCY": 2,
        "POLICY_UNIFORM": 3,
        "POLICY_RANDOM": 4,
        "POLICY_FULL": 5,
        "POLICY_RETRIEVAL": 6,
    }


def test_package_is_versioned_when_described() -> None:
    assert lens_serve_pb2.DESCRIPTOR.package == "lens_serve.v1"


# service -> method -> (request, response, client_streaming, server_streaming)
SERVICES: dict[str, dict[str, tuple[str, str, bool, bool]]] = {
    "LensServe": {
        "CreateSession": ("CreateSessionRequest", "Session", False, False),
        "DeleteSession": ("DeleteSessionRequest", "DeleteSessionResponse", False, False),
        "GetSession": ("GetSessionRequest", "Session", False, False),
        "Append": ("AppendRequest", "AppendResponse", True, False),
        "Generate": ("GenerateRequest", "GenerateResponse", False, True),
        "Score": ("ScoreRequest", "ScoreResponse", False, False),
        "GetWorkingContext": ("GetWorkingContextRequest", "WorkingContext", False, False),
    },
    "LensAdmin": {
        "GetLensStatus": ("GetLensStatusRequest", "LensStatus", False, False),
        "SetLensVersion": ("SetLensVersionRequest", "SetLensVersionResponse", False, False),
    },
}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_service_has_design_methods_when_described(service: str) -> None:
    descriptor = lens_serve_pb2.DESCRIPTOR.services_by_name[service]
    actual = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in descriptor.methods
    }
    assert actual == SERVICES[service]


def test_record_roundtrips_when_serialized() -> None:
    record = lens_serve_pb2.PreferenceRecord(
        model="tiny",
        block_size=32,
        lifetime_token_ids=[1, 2, 3],
        target_token_ids=[4],
        variants=[
            lens_serve_pb2.ShadowVariant(
                kind="served",
                mean_nll=1.5,
                spec=lens_serve_pb2.WorkingContextSpec(
                    spans=[lens_serve_pb2.SpanSpec(start=0, end=3, lod=0)]
                ),
            )
        ],
        policy=lens_serve_pb2.POLICY_LENS,
    )
    decoded = lens_serve_pb2.PreferenceRecord.FromString(record.SerializeToString())
    assert decoded == record
    assert decoded.variants[0].spec.spans[0].end == 3
