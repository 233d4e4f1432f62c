"""OpenAI response bodies and stream chunks built from the domain's generate events: completions
(`text_completion`) and chat completions (`chat.completion`, `chat.completion.chunk`), with the
usage's `lens` object."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lens_serve.engine.protocol import Logprob, TokenLogprobs
from lens_serve.service.requests import ContextView, GenerateEvent, Usage

Json = dict[str, Any]

# JSON has no -inf (a token the model rules out): OpenAI's and vLLM's servers send this instead.
_MIN_LOGPROB = -9999.0


@dataclass
class Choice:
    """One choice's answer, gathered as its events arrive."""

    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str = ""
    usage: Usage | None = None
    view: ContextView | None = None

    def add(self, event: GenerateEvent) -> None:
        self.texts.append(event.text)
        self.logprobs += event.logprobs or []
        if event.usage is not None:
            self.finish_reason, self.usage, self.view = event.finish_reason, event.usage, event.view

    @property
    def text(self) -> str:
        return "".join(self.texts)


def usage_json(choices: list[Choice], session_id: str) -> Json:
    """OpenAI's usage (all choices' completion tokens) with lens-serve's `lens` object: the
    accounting of the first choice's working context and its map."""
    first = choices[0]
    if first.usage is None:
        raise RuntimeError("a generation ended without its usage")
    completion_tokens = sum(c.usage.completion_tokens for c in choices if c.usage is not None)
    return {
        "prompt_tokens": first.usage.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": first.usage.prompt_tokens + completion_tokens,
        "lens": lens_usage(first.usage, first.view, session_id),
    }


def lens_usage(usage: Usage, view: ContextView | None, session_id: str) -> Json:
    """The Usage fields (as over gRPC) plus the session, the budget and the working context's
    spans: which stretches of the lifetime the model saw raw (lod 0) and which as gists."""
    spans = [] if view is None else view.working_context.spans()
    return {
        **dataclasses.asdict(usage),
        "session_id": session_id,
        "wc_budget": 0 if view is None else view.budget,
        "working_context": [
            {
                "start": int(s.start),
                "end": int(s.end),
                "lod": int(s.lod),
                "rows": int(s.rows),
                "score": float(s.score),
                "recalled": bool(s.recalled),
            }
            for s in spans
        ],
    }


class CompletionFormat:
    """POST /v1/completions: a choice is its text; logprobs in the legacy tokens/token_logprobs
    shape."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, with_logprobs: bool) -> None:
        self._with_logprobs = with_logprobs
        self._offsets: dict[int, int] = {}
        """Characters each choice has streamed so far (text_offset)."""

    def choice(self, index: int, choice: Choice) -> Json:
        return self.chunk(index, choice.text, choice.logprobs, choice.finish_reason)

    def chunk(
        self, index: int, text: str, logprobs: list[TokenLogprobs], finish_reason: str
    ) -> Json:
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + len(text)
        return {
            "index": index,
            "text": text,
            "logprobs": self._logprobs(logprobs, offset) if self._with_logprobs else None,
            "finish_reason": finish_reason or None,
        }

    @staticmethod
    def _logprobs(logprobs: list[TokenLogprobs], offset: int) -> Json:
        offsets = []
        for position in logprobs:
            offsets.append(offset)
            offset += len(position.token.token)
        return {
            "tokens": [p.token.token for p in logprobs],
            "token_logprobs": [_value(p.token) for p in logprobs],
            "top_logprobs": [{t.token: _value(t) for t in p.top_logprobs} for p in logprobs],
            "text_offset": offsets,
        }


class ChatFormat:
    """POST /v1/chat/completions: a choice is an assistant message; stream chunks carry deltas,
    the first one of a choice its role."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, with_logprobs: bool) -> None:
        self._with_logprobs = with_logprobs
        self._started: set[int] = set()

    def choice(self, index: int, choice: Choice) -> Json:
        return {
            "index": index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": self._logprobs(choice.logprobs) if self._with_logprobs else None,
            "finish_reason": choice.finish_reason or None,
        }

    def chunk(
        self, index: int, text: str, logprobs: list[TokenLogprobs], finish_reason: str
    ) -> Json:
        delta = {"content": text}
        if index not in self._started:
            self._started.add(index)
            delta = {"role": "assistant", **delta}
        return {
            "index": index,
            "delta": delta,
            "logprobs": self._logprobs(logprobs) if self._with_logprobs else None,
            "finish_reason": finish_reason or None,
        }

    @staticmethod
    def _logprobs(logprobs: list[TokenLogprobs]) -> Json:
        return {
            "content": [
                {**_entry(p.token), "top_logprobs": [_entry(t) for t in p.top_logprobs]}
                for p in logprobs
            ]
        }


ResponseFormat = CompletionFormat | ChatFormat


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, _MIN_LOGPROB)


def _entry(logprob: Logprob) -> Json:
    return {
        "token": logprob.token,
        "logprob": _value(logprob),
        "bytes": list(logprob.token.encode()),
    }
