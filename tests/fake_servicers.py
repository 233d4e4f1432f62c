"""Fake LensServe/LensAdmin servicers on the production `build_server` (interceptor, health,
reflection) for unit tests of the interceptor and the clients; no engine, no Redis.

Behaviour is picked by request fields: GetSession's `session_id` names an error to raise, Generate's
`prompt` a streaming scenario. Echo fields report what the server saw (owner, metadata, policy).
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import redis.exceptions
from grpc_health.v1 import health

from lens_serve.errors import InvalidRequest, NotFound, NotReady, Overloaded
from lens_serve.service.auth import current_owner
from lens_serve.service.config import Settings
from lens_serve.service.server import build_server
from lens_serve.v1 import lens_serve_pb2 as pb
from lens_serve.v1 import lens_serve_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]

SECRET_DETAIL = "db password is hunter2"
"""Text of the RuntimeError the fake raises; must never reach a client."""


def make_settings(**fields: Any) -> Settings:
    """Settings from keyword fields (mypy sees pydantic's Field defaults as required arguments)."""
    return Settings(**fields)


def _metadata_value(context: Context, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


@dataclass
class Observed:
    """What the fake servicer saw, for assertions."""

    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    append_chunks: list[pb.AppendRequest] = field(default_factory=list)
    generate_requests: list[pb.GenerateRequest] = field(default_factory=list)
    score_requests: list[pb.ScoreRequest] = field(default_factory=list)


class FakeServeServicer(pb_grpc.LensServeServicer):
    def __init__(self) -> None:
        self.observed = Observed()

    async def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.Session:
        return pb.Session(session_id=current_owner())

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        return pb.DeleteSessionResponse()

    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.Session:
        match request.session_id:
            case "invalid":
                raise InvalidRequest("session_id", "must be 32 hex characters")
            case "missing":
                raise NotFound("session_id 'missing': session not found")
            case "busy":
                raise Overloaded("too many requests in flight")
            case "loading":
                raise NotReady("weights still loading")
            case "boom":
                raise RuntimeError(SECRET_DETAIL)
            case "redis":
                raise redis.exceptions.ConnectionError("Error 111 connecting to unix:/x.sock")
            case "abort":
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "handler aborted")
            case "set-code":
                context.set_code(grpc.StatusCode.ALREADY_EXISTS)
                context.set_details("set by the handler")
        return pb.Session(session_id=request.session_id, lifetime_tokens=7)

    async def Append(
        self, request_iterator: AsyncIterator[pb.AppendRequest], context: Context
    ) -> pb.AppendResponse:
        total = 0
        session_id = ""
        async for chunk in request_iterator:
            self.observed.append_chunks.append(chunk)
            if chunk.text == "bad":
                raise InvalidRequest("text", "refused by the fake")
            session_id = session_id or chunk.session_id
            total += len(chunk.text) + len(chunk.token_ids)
        return pb.AppendResponse(
            session_id=session_id, lifetime_tokens=total, appended_tokens=total
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.observed.generate_requests.append(request)
        try:
            if request.prompt == "owner":
                yield pb.GenerateResponse(text=current_owner(), finish_reason="stop")
                return
            for i in range(3):
                yield pb.GenerateResponse(text=f"t{i}", token_ids=[i])
                if request.prompt == "midway" and i == 1:
                    raise RuntimeError(SECRET_DETAIL)
                if request.prompt == "midway-invalid" and i == 0:
                    raise InvalidRequest("prompt", "refused after one chunk")
                if request.prompt == "slow":
                    await asyncio.sleep(60)
            yield pb.GenerateResponse(finish_reason="stop", usage=pb.Usage(completion_tokens=3))
        except asyncio.CancelledError:
            self.observed.cancelled.set()
            raise
        finally:
            self.observed.closed.set()

    async def Score(self, request: pb.ScoreRequest, context: Context) -> pb.ScoreResponse:
        self.observed.score_requests.append(request)
        return pb.ScoreResponse(mean_nll=1.5, token_nll=[1.0, 2.0])

    async def GetWorkingContext(
        self, request: pb.GetWorkingContextRequest, context: Context
    ) -> pb.WorkingContext:
        # Echoes what arrived: the policy enum name and the raw authorization metadata.
        return pb.WorkingContext(
            policy=pb.Policy.Name(request.policy),
            lens_version=_metadata_value(context, "authorization"),
            budget=request.wc_budget,
        )


class FakeAdminServicer(pb_grpc.LensAdminServicer):
    async def GetLensStatus(
        self, request: pb.GetLensStatusRequest, context: Context
    ) -> pb.LensStatus:
        return pb.LensStatus(current_version=current_owner())

    async def SetLensVersion(
        self, request: pb.SetLensVersionRequest, context: Context
    ) -> pb.SetLensVersionResponse:
        return pb.SetLensVersionResponse(previous_version="v0", current_version=request.version)


@dataclass
class FakeServer:
    target: str
    servicer: FakeServeServicer
    health: health.aio.HealthServicer


@asynccontextmanager
async def running_fake_server(settings: Settings) -> AsyncIterator[FakeServer]:
    """The production build_server with the fakes, started on 127.0.0.1:0; stopped afterwards."""
    servicer = FakeServeServicer()
    health_servicer = health.aio.HealthServicer()
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": 0})
    server, port = build_server(
        settings,
        serve_servicer=servicer,
        admin_servicer=FakeAdminServicer(),
        health=health_servicer,
    )
    await server.start()
    try:
        yield FakeServer(f"127.0.0.1:{port}", servicer, health_servicer)
    finally:
        await server.stop(grace=None)
