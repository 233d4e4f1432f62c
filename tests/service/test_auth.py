"""Bearer-token rules per gRPC method (lens_serve.service.auth)."""

import asyncio
import contextvars

import pytest

from lens_serve.errors import PermissionDenied, Unauthenticated
from lens_serve.service import auth
from lens_serve.service.config import Settings
from tests.fake_servicers import make_settings

GENERATE = "/lens_serve.v1.LensServe/Generate"
SET_VERSION = "/lens_serve.v1.LensAdmin/SetLensVersion"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def bearer(token: str) -> list[tuple[str, str | bytes]]:
    return [("user-agent", "test"), ("authorization", f"Bearer {token}")]


@pytest.fixture
def secured() -> Settings:
    return make_settings(api_tokens="alpha, beta", admin_token="root-secret")


def test_authorize_open_when_no_tokens_configured() -> None:
    settings = make_settings()
    assert auth.authorize(GENERATE, [], settings) == auth.ANONYMOUS
    assert auth.authorize(GENERATE, bearer("anything"), settings) == auth.ANONYMOUS
    # Local use: with no tokens at all, the admin service is open too.
    assert auth.authorize(SET_VERSION, None, settings) == auth.ANONYMOUS


def test_authorize_accepts_each_configured_token(secured: Settings) -> None:
    alpha = auth.authorize(GENERATE, bearer("alpha"), secured)
    beta = auth.authorize(GENERATE, bearer("beta"), secured)
    assert alpha == auth.owner_for_token("alpha")
    assert beta == auth.owner_for_token("beta")
    assert alpha != beta


def test_authorize_scheme_case_insensitive(secured: Settings) -> None:
    metadata: list[tuple[str, str | bytes]] = [("authorization", "bearer   alpha ")]
    assert auth.authorize(GENERATE, metadata, secured) == auth.owner_for_token("alpha")


def test_authorize_refuses_missing_token(secured: Settings) -> None:
    with pytest.raises(Unauthenticated, match="authorization"):
        auth.authorize(GENERATE, [("user-agent", "test")], secured)


def test_authorize_refuses_wrong_token_without_echoing_it(secured: Settings) -> None:
    with pytest.raises(Unauthenticated, match="authorization") as caught:
        auth.authorize(GENERATE, bearer("not-a-real-token"), secured)
    assert "not-a-real-token" not in str(caught.value)


def test_authorize_refuses_non_bearer_scheme(secured: Settings) -> None:
    with pytest.raises(Unauthenticated, match="Bearer") as caught:
        auth.authorize(GENERATE, [("authorization", "Basic alpha")], secured)
    assert "alpha" not in str(caught.value)


def test_authorize_admin_needs_admin_token(secured: Settings) -> None:
    assert auth.authorize(SET_VERSION, bearer("root-secret"), secured) == auth.ADMIN
    with pytest.raises(Unauthenticated):
        auth.authorize(SET_VERSION, [], secured)
    with pytest.raises(Unauthenticated):
        auth.authorize(SET_VERSION, bearer("wrong"), secured)
    # An API token is a known caller without admin rights.
    with pytest.raises(PermissionDenied):
        auth.authorize(SET_VERSION, bearer("alpha"), secured)


def test_authorize_admin_token_is_not_an_api_token(secured: Settings) -> None:
    with pytest.raises(Unauthenticated):
        auth.authorize(GENERATE, bearer("root-secret"), secured)


def test_authorize_admin_refused_when_only_api_tokens_set() -> None:
    settings = make_settings(api_tokens="alpha")
    with pytest.raises(PermissionDenied, match="admin_token is not configured"):
        auth.authorize(SET_VERSION, bearer("alpha"), settings)


def test_authorize_admin_token_alone_leaves_api_open() -> None:
    settings = make_settings(admin_token="root-secret")
    assert auth.authorize(GENERATE, [], settings) == auth.ANONYMOUS
    with pytest.raises(Unauthenticated):
        auth.authorize(SET_VERSION, [], settings)


@pytest.mark.parametrize("method", [HEALTH, "/grpc.health.v1.Health/Watch", REFLECTION])
def test_authorize_health_and_reflection_always_open(secured: Settings, method: str) -> None:
    assert auth.authorize(method, [], secured) == auth.ANONYMOUS
    assert auth.authorize(method, bearer("wrong"), secured) == auth.ANONYMOUS


def test_owner_for_token_stable_and_opaque() -> None:
    owner = auth.owner_for_token("s3cret-token")
    assert owner == auth.owner_for_token("s3cret-token")
    assert owner.startswith("tok:")
    assert "s3cret" not in owner
    assert len(owner) == len("tok:") + 16


def test_current_owner_outside_rpc_raises() -> None:
    with pytest.raises(RuntimeError, match="outside an RPC"):
        contextvars.Context().run(auth.current_owner)  # an empty context: no RPC bound an owner


async def test_current_owner_isolated_per_task() -> None:
    async def call(owner: str) -> str:
        auth.bind_owner(owner)
        await asyncio.sleep(0.01)  # interleave with the other task
        return auth.current_owner()

    results = await asyncio.gather(call("tok:a"), call("tok:b"))
    assert list(results) == ["tok:a", "tok:b"]
