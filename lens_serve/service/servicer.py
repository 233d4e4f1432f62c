"""gRPC servicers: protos <-> the domain service, nothing else (no math, no Redis calls).

Errors are raised as LensError subclasses and mapped to status codes by the interceptor; the caller
(owner) comes from `auth.current_owner()`, set by the same interceptor."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from lens_serve.engine.protocol import Logprob, TokenLogprobs
from lens_serve.errors import InvalidRequest
from lens_serve.policy_names import POLICY_NAMES, POLICY_VALUES
from lens_serve.service.auth import current_owner
from lens_serve.service.lens_service import LensService
from lens_serve.service.requests import (
    ChatMessage,
    ContextView,
    GenerateInput,
    Sampling,
    ScoreInput,
)
from lens_serve.v1 import lens_serve_pb2 as pb
from lens_serve.v1 import lens_serve_pb2_grpc as pb_grpc

# The servicer never reads or writes the context: errors travel as exceptions (see the module doc).
Context = grpc.aio.ServicerContext[Any, Any]


def policy_name(value: int) -> str:
    if value not in POLICY_NAMES:  # proto3 enums are open: any int can arrive
        raise InvalidRequest("policy", f"unknown Policy value {value}")
    return POLICY_NAMES[value]


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def working_context_proto(view: ContextView) -> pb.WorkingContext:
    wc = view.working_context
    return pb.WorkingContext(
        spans=[
            pb.Span(
                start=s.start,
                end=s.end,
                lod=s.lod,
                score=s.score,
                rows=s.rows,
                recalled=s.recalled,
            )
            for s in wc.spans()
        ],
        lens_version=wc.lens_version,
        lifetime_tokens=wc.lifetime,
        rows=wc.rows,
        budget=view.budget,
        policy=wc.policy,
        gistnet_version=view.gistnet_version,
        query_source=view.query_source,
        query_tokens=view.query_tokens,
    )


def _logprob_proto(logprob: Logprob) -> pb.Logprob:
    return pb.Logprob(token_id=logprob.token_id, token=logprob.token, logprob=logprob.logprob)


def logprobs_proto(logprobs: list[TokenLogprobs]) -> list[pb.TokenLogprobs]:
    return [
        pb.TokenLogprobs(
            token=_logprob_proto(position.token),
            top_logprobs=[_logprob_proto(top) for top in position.top_logprobs],
        )
        for position in logprobs
    ]


class LensServeServicer(pb_grpc.LensServeServicer):
    def __init__(self, service: LensService) -> None:
        self._service = service

    @property
    def service(self) -> LensService:
        """The domain service behind these RPCs (the HTTP endpoint serves the same one)."""
        return self._service

    async def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.Session:
        info = await self._service.create_session(current_owner())
        return pb.Session(
            session_id=info.session_id, lifetime_tokens=0, created_at=_timestamp(info.created_at)
        )

    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.Session:
        info, levels = await self._service.get_session(current_owner(), request.session_id)
        return pb.Session(
            session_id=info.session_id,
            lifetime_tokens=info.lifetime_tokens,
            levels=levels,
            created_at=_timestamp(info.created_at),
        )

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        await self._service.delete_session(current_owner(), request.session_id)
        return pb.DeleteSessionResponse()

    async def Append(
        self, request_iterator: AsyncIterator[pb.AppendRequest], context: Context
    ) -> pb.AppendResponse:
        first = await anext(request_iterator, None)
        if first is None or not first.session_id:
            raise InvalidRequest("session_id", "must be set on the first chunk")
        session_id = first.session_id

        async def parts() -> AsyncGenerator[str | Sequence[int], None]:
            """The chunks as the service's parts, checked as they arrive: the service reads them
            while they stream, so that it can refuse an upload before its end."""
            chunk: pb.AppendRequest | None = first
            while chunk is not None:
                if chunk.session_id and chunk.session_id != session_id:
                    raise InvalidRequest("session_id", "must be the same on every chunk")
                if chunk is not first and chunk.idempotency_key:
                    raise InvalidRequest("idempotency_key", "goes on the first chunk only")
                if chunk.text and chunk.token_ids:
                    raise InvalidRequest("text", "a chunk carries text or token_ids, not both")
                yield chunk.token_ids if chunk.token_ids else chunk.text
                chunk = await anext(request_iterator, None)

        async with aclosing(parts()) as stream:
            lifetime, appended = await self._service.append(
                current_owner(), session_id, stream, first.idempotency_key
            )
        return pb.AppendResponse(
            session_id=session_id, lifetime_tokens=lifetime, appended_tokens=appended
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        sampling = request.sampling
        generate_input = GenerateInput(
            session_id=request.session_id,
            prompt=request.prompt,
            prompt_token_ids=tuple(request.prompt_token_ids),
            sampling=Sampling(
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed,
                stop=tuple(sampling.stop),
                top_k=sampling.top_k,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                repetition_penalty=sampling.repetition_penalty,
                logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
            ),
            wc_budget=request.wc_budget,
            policy=policy_name(request.policy),
            chat=request.chat,
            idempotency_key=request.idempotency_key,
            messages=tuple(ChatMessage(m.role, m.content) for m in request.messages),
        )
        async for event in self._service.generate(current_owner(), generate_input):
            response = pb.GenerateResponse(
                text=event.text,
                token_ids=event.token_ids,
                finish_reason=event.finish_reason,
                request_id=event.request_id,
                logprobs=logprobs_proto(event.logprobs or []),
            )
            if event.usage is not None:
                u = event.usage
                response.usage.CopyFrom(
                    pb.Usage(
                        lifetime_tokens=u.lifetime_tokens,
                        wc_rows=u.wc_rows,
                        gist_covered_tokens=u.gist_covered_tokens,
                        lens_version=u.lens_version,
                        wc_choice_ms=u.wc_choice_ms,
                        completion_tokens=u.completion_tokens,
                        cached_rows=u.cached_rows,
                        prompt_tokens=u.prompt_tokens,
                        policy=POLICY_VALUES[u.policy],
                        gistnet_version=u.gistnet_version,
                        query_source=u.query_source,
                        query_tokens=u.query_tokens,
                        replayed=u.replayed,
                    )
                )
            yield response

    async def Score(self, request: pb.ScoreRequest, context: Context) -> pb.ScoreResponse:
        result = await self._service.score(
            current_owner(),
            ScoreInput(
                session_id=request.session_id,
                context=request.context,
                context_token_ids=tuple(request.context_token_ids),
                continuation=request.continuation,
                continuation_token_ids=tuple(request.continuation_token_ids),
                wc_budget=request.wc_budget,
                policy=policy_name(request.policy),
                query=request.query,
                query_token_ids=tuple(request.query_token_ids),
            ),
        )
        return pb.ScoreResponse(
            mean_nll=result.mean_nll,
            token_nll=result.token_nll,
            working_context=working_context_proto(result.view),
            continuation_token_ids=result.continuation_token_ids,
        )

    async def GetWorkingContext(
        self, request: pb.GetWorkingContextRequest, context: Context
    ) -> pb.WorkingContext:
        view = await self._service.working_context(
            current_owner(),
            request.session_id,
            request.wc_budget,
            policy_name(request.policy),
            query=request.query,
            query_token_ids=request.query_token_ids,
        )
        return working_context_proto(view)


class LensAdminServicer(pb_grpc.LensAdminServicer):
    def __init__(self, service: LensService) -> None:
        self._weights = service.weights

    async def GetLensStatus(
        self, request: pb.GetLensStatusRequest, context: Context
    ) -> pb.LensStatus:
        current, versions, unloadable = await self._weights.published()
        info = [
            pb.LensVersion(
                version=v.version,
                created_at=_timestamp(v.created_at),
                parent=v.parent,
                metrics_json=json.dumps(v.metrics, sort_keys=True),
                unloadable_reason=unloadable.pop(v.version, ""),
            )
            for v in versions
        ]
        # What is left are records too malformed to date: listed last, so they can be found.
        info += [
            pb.LensVersion(version=n, unloadable_reason=r) for n, r in sorted(unloadable.items())
        ]
        return pb.LensStatus(
            current_version=current or self._weights.version,
            versions=[i.version for i in info],
            version_info=info,
            loaded_version=self._weights.version,
            not_current_reason=self._weights.not_current_reason,
        )

    async def SetLensVersion(
        self, request: pb.SetLensVersionRequest, context: Context
    ) -> pb.SetLensVersionResponse:
        previous = await self._weights.pin(request.version)
        return pb.SetLensVersionResponse(previous_version=previous, current_version=request.version)
