"""Who is calling: bearer-token checks per gRPC method, and the caller's owner id for this RPC.

The interceptor calls `authorize` inside each RPC's task and binds the result; servicers read it
with `current_owner()`. Owner ids are derived from tokens and never contain them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from contextvars import ContextVar

from lens_serve.errors import PermissionDenied, Unauthenticated
from lens_serve.service.config import Settings

AUTH_METADATA_KEY = "authorization"
"""gRPC metadata key of the bearer token (gRPC lower-cases keys on the wire)."""
ANONYMOUS = "anonymous"
"""Owner of every call when API auth is disabled, and of health/reflection calls."""
ADMIN = "admin"
"""Owner of calls authenticated with the admin token."""

LENS_SERVE_PREFIX = "/lens_serve.v1.LensServe/"
LENS_ADMIN_PREFIX = "/lens_serve.v1.LensAdmin/"
# Probes and tooling must work without credentials: K8s grpc probes cannot send metadata.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# 16 hex digits = 64 bits of sha256: collisions between distinct tokens are negligible, and the
# prefix reveals nothing useful about the token.
_OWNER_HASH_CHARS = 16

_OWNER: ContextVar[str] = ContextVar("lens_serve_owner")

Metadata = Iterable[tuple[str, str | bytes]]


def current_owner() -> str:
    """The owner id of the RPC running in this task; RuntimeError outside an authorized RPC."""
    try:
        return _OWNER.get()
    except LookupError:
        raise RuntimeError(
            "current_owner() called outside an RPC: no caller was authorized in this context"
        ) from None


def bind_owner(owner: str) -> None:
    """Sets the owner for the current context (the interceptor does this once per RPC task).

    No reset token is handed out on purpose: each gRPC call runs in its own task, whose context
    dies with it, and a reset from a streaming wrapper finalized in another task would fail.
    """
    _OWNER.set(owner)


def owner_for_token(token: str) -> str:
    """A stable opaque owner id for a bearer token; never the token itself."""
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
    return f"tok:{digest[:_OWNER_HASH_CHARS]}"


def bearer_token(metadata: Metadata | None) -> str | None:
    """The token of the first `authorization: Bearer <t>` entry; None if there is no such entry.

    Raises Unauthenticated for an `authorization` entry that is not a bearer token.
    """
    for key, value in metadata or ():
        if key.lower() != AUTH_METADATA_KEY:
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(f"{AUTH_METADATA_KEY} metadata must be 'Bearer <token>'")
        return token
    return None


def _matches(token: str, accepted: Iterable[str]) -> bool:
    candidate = token.encode("utf-8")
    # Compare against every accepted token (no early exit), each in constant time.
    results = [hmac.compare_digest(candidate, t.encode("utf-8")) for t in accepted]
    return any(results)


def authorize(method: str, metadata: Metadata | None, settings: Settings) -> str:
    """Checks the call's credentials for `method` (a full gRPC method path) and returns its owner.

    - health and reflection: always open (owner "anonymous");
    - LensAdmin: needs `settings.admin_token`; with no admin token the service is open only when
      API auth is disabled too (local use), else PERMISSION_DENIED;
    - LensServe (and anything else): needs one of `settings.tokens` when that set is non-empty.

    Raises Unauthenticated (missing or unknown token) or PermissionDenied.
    """
    if method.startswith(OPEN_PREFIXES):
        return ANONYMOUS
    api_tokens = settings.tokens
    if method.startswith(LENS_ADMIN_PREFIX):
        if not settings.admin_token:
            if api_tokens:
                raise PermissionDenied("admin_token is not configured: the admin service is off")
            return ANONYMOUS
        token = _require_token(metadata)
        if _matches(token, (settings.admin_token,)):
            return ADMIN
        if _matches(token, api_tokens):
            raise PermissionDenied("LensAdmin methods need the admin token")
        raise Unauthenticated(f"{AUTH_METADATA_KEY} metadata: unknown token")
    if not api_tokens:
        return ANONYMOUS
    token = _require_token(metadata)
    if _matches(token, api_tokens):
        return owner_for_token(token)
    raise Unauthenticated(f"{AUTH_METADATA_KEY} metadata: unknown token")


def _require_token(metadata: Metadata | None) -> str:
    token = bearer_token(metadata)
    if token is None:
        raise Unauthenticated(f"missing {AUTH_METADATA_KEY} metadata ('Bearer <token>')")
    return token
