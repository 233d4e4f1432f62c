"""Reference teacher-forced NLL through transformers (the serving path uses vLLM's engine).

Used by the demo, the gist benchmarks and tests: it reads the same `inputs_embeds` rows that vLLM
gets, so a policy's NLL here is what the served model would see."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def load_causal_lm(model_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model


@torch.inference_mode()
def continuation_nll(
    model: Any, context_embeds: torch.Tensor, continuation_ids: torch.Tensor
) -> torch.Tensor:
    """(n_ctx, D) context rows + (n_cont,) token ids -> (n_cont,) NLL of each continuation token.

    The first continuation token is predicted from the last context row."""
    if context_embeds.shape[0] == 0:
        raise ValueError("context_embeds: at least one context row is needed")
    embed = model.get_input_embeddings()
    dtype = embed.weight.dtype
    cont = embed(continuation_ids.long())  # (n_cont, D)
    rows = torch.cat([context_embeds.to(dtype), cont])[None]  # (1, n_ctx + n_cont, D)
    logits = model(inputs_embeds=rows).logits[0].float()  # (n_ctx + n_cont, V)
    n_ctx = context_embeds.shape[0]
    predicting = logits[n_ctx - 1 : -1]  # (n_cont, V): row i predicts continuation token i
    return F.cross_entropy(predicting, continuation_ids.long(), reduction="none")


def paired_difference(nll: list[float], baseline: list[float]) -> dict[str, float]:
    """Per-window NLL minus the baseline's on the same windows (< 0: better): its mean, standard
    error and how many windows are worse. Windows differ far more from each other than conditions
    do, so only paired differences say which condition wins."""
    diffs = [a - b for a, b in zip(nll, baseline, strict=True)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {"mean": statistics.mean(diffs), "se": se, "worse": sum(d > 0 for d in diffs)}
