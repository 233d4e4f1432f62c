"""`sample_logprobs`: vLLM's per-token logprob dicts (the generated token and the top-ranked ones)
as the engine's TokenLogprobs, without an engine."""

from __future__ import annotations

import pytest
from vllm.logprobs import Logprob as VllmLogprob

from lens_serve.engine.protocol import EngineError, Logprob, TokenLogprobs
from lens_serve.engine.vllm import sample_logprobs


def entry(*ranked: tuple[int, float, int]) -> dict[int, VllmLogprob]:
    return {token: VllmLogprob(lp, rank, f"t{token}") for token, lp, rank in ranked}


def test_generated_token_and_the_top_ones_in_rank_order() -> None:
    # vLLM's dict order is not rank order; the generated token 9 ranks third, outside the top 2.
    entries = [entry((5, -1.5, 2), (9, -2.0, 3), (4, -0.5, 1)), entry((6, -0.1, 1), (3, -3.0, 2))]
    assert sample_logprobs([9, 6], entries, top=2) == [
        TokenLogprobs(Logprob(9, "t9", -2.0), [Logprob(4, "t4", -0.5), Logprob(5, "t5", -1.5)]),
        TokenLogprobs(Logprob(6, "t6", -0.1), [Logprob(6, "t6", -0.1), Logprob(3, "t3", -3.0)]),
    ]


def test_top_zero_gives_the_generated_token_alone() -> None:
    [position] = sample_logprobs([6], [entry((6, -0.1, 1))], top=0)
    assert position == TokenLogprobs(Logprob(6, "t6", -0.1), [])


def test_an_empty_chunk_has_no_logprobs() -> None:
    assert sample_logprobs([], None, top=3) == []


@pytest.mark.parametrize(
    ("token_ids", "entries"),
    [([6], None), ([6, 7], [entry((6, -0.1, 1))]), ([7], [entry((6, -0.1, 1))])],
)
def test_missing_or_misaligned_logprobs_raise(
    token_ids: list[int], entries: list[dict[int, VllmLogprob]] | None
) -> None:
    with pytest.raises(EngineError):
        sample_logprobs(token_ids, entries, top=1)
