"""Distil a `transformer` GistNet through the frozen base model (`lens-trainer gistnet`).

A sample is `[prefix raw tokens][span][horizon raw tokens]`. The teacher reads the span raw; the
student reads it as gist rows (LOD1: `blocks` blocks in a row, each its own gist; LOD2: one gist of
`block_size` blocks, gisted twice). Serving shows long runs of gists before the raw tail, so a
sample should too: one gist inside raw text teaches little about reading thirty in a row. Loss over
the horizon: KL(teacher || student) of the next-token distributions plus `nll_weight` times the
NLL of the true tokens. The base model is frozen, so gradients reach only the GistNet. Stage 1
trains LOD1 for `lod1_steps`, stage 2 LOD2 for `lod2_steps` (the curriculum).

Batches depend only on (seed, step), so a run resumed from its checkpoint continues exactly."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed

from lens_serve.gistnet import GistNet, GistNetConfig, build_gistnet, load_gistnet, save_gistnet

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class DistillConfig:
    rows: int = 1
    """Gist rows per block (the compression knob: block_size / rows)."""
    block_size: int = 32
    blocks: int = 1
    """LOD1 samples: consecutive blocks replaced by their gists."""
    prefix: int = 64
    """Raw tokens before the gisted span."""
    horizon: int = 64
    """Raw tokens after it, where the two distributions are compared."""
    lod1_steps: int = 100
    lod2_steps: int = 0
    batch_size: int = 4
    lr: float = 1e-3
    nll_weight: float = 0.1
    seed: int = 0
    checkpoint_every: int = 25


def span_tokens(config: DistillConfig, lod: int) -> int:
    return config.blocks * config.block_size if lod == 1 else config.block_size**lod


def sample_batch(tokens: torch.Tensor, config: DistillConfig, lod: int, step: int) -> torch.Tensor:
    """(batch, prefix + span + horizon) windows of the token stream; a function of (seed, step)."""
    length = config.prefix + span_tokens(config, lod) + config.horizon
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - length, (config.batch_size,), generator=generator)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])  # (N, L)


def gist_rows(net: GistNet, span_ids: torch.Tensor, embed: torch.nn.Module, lod: int) -> Any:
    """(N, S) span tokens -> (N, S / B * R, D) LOD1 gist rows, or (lod 2, S = B^2) (N, R, D)."""
    n, b = span_ids.shape[0], net.config.block_size
    blocks = span_ids.reshape(-1, b)  # (N * S / B, B)
    gists = net(blocks, embed(blocks))  # embeds (N * S / B, R, D)
    if lod == 2:
        ids = gists.token_ids.reshape(n, -1)  # (N, B * R)
        gists = net(ids, gists.embeds.reshape(n, ids.shape[1], -1))  # (N, R, D)
    return gists.embeds.reshape(n, -1, gists.embeds.shape[-1])


def distill_loss(
    model: Any, net: GistNet, batch: torch.Tensor, config: DistillConfig, lod: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL(teacher || student) + nll_weight * NLL over the horizon of `batch` (N, L).

    Also reports `gain_over_dropped`: the horizon's KL with the span dropped minus with it gisted
    (> 0: the gist tells the model more than nothing). Without a prefix the first horizon token
    has no context at all when the span is dropped, so that comparison skips it."""
    p, s = config.prefix, span_tokens(config, lod)
    embed = model.get_input_embeddings()
    target = batch[:, p + s :]  # (N, H)
    with torch.no_grad():
        teacher = model(input_ids=batch).logits[:, p + s - 1 : -1]  # (N, H, V)
        log_teacher = teacher.float().log_softmax(-1)
        dropped_ids = torch.cat([batch[:, :p], target], dim=1)  # (N, P + H)
        dropped = model(input_ids=dropped_ids).logits[:, max(p - 1, 0) : -1]  # (N, H - skip, V)
    skip = 1 if p == 0 else 0
    rows = gist_rows(net, batch[:, p : p + s], embed, lod)  # (N, R, D)
    student_in = torch.cat([embed(batch[:, :p]), rows, embed(target)], dim=1)  # (N, P + R + H, D)
    r = rows.shape[1]
    student = model(inputs_embeds=student_in).logits[:, p + r - 1 : -1]  # (N, H, V)
    log_student = student.float().log_softmax(-1)
    kl = _kl(log_teacher, log_student)
    nll = F.nll_loss(log_student.flatten(0, 1), target.flatten())
    with torch.no_grad():
        gain = _kl(log_teacher[:, skip:], dropped.float().log_softmax(-1)) - _kl(
            log_teacher[:, skip:], log_student[:, skip:]
        )
    parts = {"kl": kl.item(), "nll": nll.item(), "gain_over_dropped": gain.item()}
    return kl + config.nll_weight * nll, parts


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q), both (N, H, V) log-probabilities."""
    return F.kl_div(
        log_q.flatten(0, 1), log_p.flatten(0, 1), log_target=True, reduction="batchmean"
    )


def freeze(model: Any) -> None:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)


def new_gistnet(config: DistillConfig, hidden_size: int) -> GistNet:
    net_config = GistNetConfig(
        kind="transformer",
        block_size=config.block_size,
        rows=config.rows,
        hidden_size=hidden_size,
        seed=config.seed,
    )
    return build_gistnet(net_config)


@dataclass
class DistillResult:
    net: GistNet
    steps: int
    seconds: float
    history: list[dict[str, float]]


def distill(
    model: Any,
    tokens: torch.Tensor,
    config: DistillConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    on_checkpoint: Callable[[GistNet, int], None] | None = None,
) -> DistillResult:
    """Train (or resume) a GistNet; checkpoint every `checkpoint_every` steps and at the end."""
    freeze(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    state_path = out_dir / STATE_FILE
    if resume and state_path.exists():
        net = load_gistnet(out_dir)
        state = torch.load(state_path, weights_only=True)
        step: int = state["step"]
    else:
        net, state, step = new_gistnet(config, hidden), None, 0
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    total = config.lod1_steps + config.lod2_steps
    history: list[dict[str, float]] = []
    started = time.monotonic()
    bar = tqdm(total=total, initial=step, desc="gistnet", unit="step", mininterval=5.0)
    while step < total:
        lod = 1 if step < config.lod1_steps else 2
        loss, parts = distill_loss(model, net, sample_batch(tokens, config, lod, step), config, lod)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        step += 1
        history.append({"step": step, "lod": lod, **parts})
        bar.update(1)
        bar.set_postfix(lod=lod, kl=f"{parts['kl']:.3f}", gain=f"{parts['gain_over_dropped']:.3f}")
        if step % config.checkpoint_every == 0 or step == total:
            save_checkpoint(net, optimizer, step, out_dir)
            if on_checkpoint is not None:
                on_checkpoint(net, step)
    bar.close()
    net.eval()
    return DistillResult(net, step, time.monotonic() - started, history)


def save_checkpoint(
    net: GistNet, optimizer: torch.optim.Optimizer, step: int, out_dir: Path
) -> None:
    save_gistnet(net, out_dir)
    tmp = out_dir / f".{STATE_FILE}.tmp"
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, tmp)
    tmp.replace(out_dir / STATE_FILE)
