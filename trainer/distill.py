"""Distil a `transformer` GistNet through the frozen base model (`lens-trainer gistnet`).

A sample is `[prefix raw tokens][span][tail raw tokens][horizon raw tokens]`. The teacher reads
the span raw; the student reads it as gist rows (LOD1: `blocks` blocks in a row, each its own gist;
LOD2: one gist of `block_size` blocks, gisted twice). Serving shows long runs of gists before the
raw tail, so a sample should too: one gist inside raw text teaches little about reading thirty in a
row. Serving also keeps raw recent tokens after the gists, and the tokens right after a gist are
the ones it helps most, so a loss that scores them spends the net on what the recent tokens already
say: `tail` raw tokens are read by both models and scored by neither. Loss over the horizon:
KL(teacher || student) of the next-token distributions plus `nll_weight` times the NLL of the true
tokens. The base model is frozen, so gradients reach only the GistNet. Stage 1 trains LOD1 for
`lod1_steps`, stage 2 LOD2 for `lod2_steps` (the curriculum). New nets start from the `tokens` gist
of the model's own layout (keywords then separators, `gist_config`), or from a trained net (`init`).

With `validation_tokens`, the stream's last tokens are never trained on: at every checkpoint the
NLL the gists save over dropping the span is measured on their windows (each LOD the run trains),
and the best net so far is kept in `<out>/best`. The gain on training text says little: a run that
raised it to +0.1 nats was worse than dropping on held-out text.

Batches depend only on (seed, step), so a run resumed from its checkpoint continues exactly."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed

from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gistnet import GistNet, build_gistnet, gist_config, load_gistnet, save_gistnet

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
    tail: int = 0
    """Raw tokens after the span that both models read and the loss skips (serving's raw tail)."""
    horizon: int = 64
    """Raw tokens after the tail, where the two distributions are compared."""
    lod1_steps: int = 100
    lod2_steps: int = 0
    batch_size: int = 4
    lr: float = 1e-3
    nll_weight: float = 0.1
    seed: int = 0
    checkpoint_every: int = 25
    validation_tokens: int = 0
    """Held out from the end of the stream for validation at each checkpoint (0: none)."""


def span_tokens(config: DistillConfig, lod: int) -> int:
    return config.blocks * config.block_size if lod == 1 else config.block_size**lod


def window_tokens(config: DistillConfig, lod: int) -> int:
    """Length of a sample: prefix + span + tail + horizon."""
    return config.prefix + span_tokens(config, lod) + config.tail + config.horizon


def sample_batch(tokens: torch.Tensor, config: DistillConfig, lod: int, step: int) -> torch.Tensor:
    """(batch, window_tokens) windows of the token stream; a function of (seed, step)."""
    length = window_tokens(config, lod)
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
    (> 0: the gist tells the model more than nothing), and `nll_gain_over_dropped`, the same for
    the true tokens' NLL. Without a prefix or tail the first horizon token has no context at all
    when the span is dropped, so those comparisons skip it."""
    p, s, t = config.prefix, span_tokens(config, lod), config.tail
    embed = model.get_input_embeddings()
    after = batch[:, p + s :]  # (N, T + H) raw tokens after the span
    target = batch[:, p + s + t :]  # (N, H)
    with torch.no_grad():
        teacher = model(input_ids=batch).logits[:, p + s + t - 1 : -1]  # (N, H, V)
        log_teacher = teacher.float().log_softmax(-1)
        dropped_ids = torch.cat([batch[:, :p], after], dim=1)  # (N, P + T + H)
        dropped = model(input_ids=dropped_ids).logits[:, max(p + t - 1, 0) : -1]  # (N, H-skip, V)
    skip = 1 if p + t == 0 else 0
    rows = gist_rows(net, batch[:, p : p + s], embed, lod)  # (N, R, D)
    student_in = torch.cat([embed(batch[:, :p]), rows, embed(after)], dim=1)  # (N, P+R+T+H, D)
    r = rows.shape[1]
    student = model(inputs_embeds=student_in).logits[:, p + r + t - 1 : -1]  # (N, H, V)
    log_student = student.float().log_softmax(-1)
    kl = _kl(log_teacher, log_student)
    nll = F.nll_loss(log_student.flatten(0, 1), target.flatten())
    with torch.no_grad():
        log_dropped = dropped.float().log_softmax(-1)  # (N, H - skip, V)
        gain = _kl(log_teacher[:, skip:], log_dropped) - _kl(
            log_teacher[:, skip:], log_student[:, skip:]
        )
        scored = target[:, skip:].flatten()
        nll_gain = F.nll_loss(log_dropped.flatten(0, 1), scored) - F.nll_loss(
            log_student[:, skip:].flatten(0, 1), scored
        )
    parts = {
        "kl": kl.item(),
        "nll": nll.item(),
        "gain_over_dropped": gain.item(),
        "nll_gain_over_dropped": nll_gain.item(),
    }
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


def new_gistnet(config: DistillConfig, table: EmbeddingTable) -> GistNet:
    layout = gist_config(table, "transformer", config.block_size, config.rows)
    return build_gistnet(dataclasses.replace(layout, seed=config.seed), table)


def validation_windows(tokens: torch.Tensor, config: DistillConfig, lod: int) -> torch.Tensor:
    """(W, window_tokens) non-overlapping windows of the held-out end of `tokens`."""
    length = window_tokens(config, lod)
    held_out = tokens[tokens.numel() - config.validation_tokens :]
    count = held_out.numel() // length
    if count == 0:
        raise ValueError(
            f"validation_tokens {config.validation_tokens} hold no {length}-token window"
        )
    return held_out[: count * length].view(count, length)


def lods(config: DistillConfig) -> list[int]:
    return [1, 2] if config.lod2_steps else [1]


def validate(model: Any, net: GistNet, tokens: torch.Tensor, config: DistillConfig) -> float:
    """Mean over the trained LODs of the held-out NLL gain over dropping (nats/token, > 0 good)."""
    was_training = net.training
    net.eval()
    gains: list[float] = []
    with torch.no_grad():
        for lod in lods(config):
            windows = validation_windows(tokens, config, lod)  # (W, L)
            for start in range(0, windows.shape[0], config.batch_size):
                batch = windows[start : start + config.batch_size]
                _, parts = distill_loss(model, net, batch, config, lod)
                gains.append(parts["nll_gain_over_dropped"] * batch.shape[0] / windows.shape[0])
    net.train(was_training)
    return sum(gains) / len(lods(config))


@dataclass
class DistillResult:
    net: GistNet
    steps: int
    seconds: float
    history: list[dict[str, float]]
    best_validation: float | None = None
    """The best held-out NLL gain over dropping (the net in <out>/best), None without validation."""


def distill(
    model: Any,
    table: EmbeddingTable,
    tokens: torch.Tensor,
    config: DistillConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    init: GistNet | None = None,
    on_checkpoint: Callable[[GistNet, int], None] | None = None,
) -> DistillResult:
    """Train (or resume) a GistNet; checkpoint every `checkpoint_every` steps and at the end.

    `init` starts a new run from a trained net (a fresh optimizer, step 0) instead of the `tokens`
    layout: fine-tuning under a new objective. Its layout must be the config's."""
    freeze(model)
    state_path = out_dir / STATE_FILE
    best: float | None = None
    if resume and state_path.exists():
        net = load_gistnet(out_dir)
        state = torch.load(state_path, weights_only=True)
        step: int = state["step"]
        best = state.get("best_validation")
    else:
        net, state, step = new_gistnet(config, table), None, 0
        if init is not None:
            if dataclasses.replace(init.config, seed=config.seed) != net.config:
                raise ValueError(
                    f"init GistNet {init.version} is not this run's layout: {init.config} != "
                    f"{net.config}"
                )
            net.load_state_dict(init.state_dict())
    training = tokens[: tokens.numel() - config.validation_tokens]  # (T - validation,)
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
        batch = sample_batch(training, config, lod, step)
        loss, parts = distill_loss(model, net, batch, config, lod)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        step += 1
        history.append({"step": step, "lod": lod, **parts})
        bar.update(1)
        bar.set_postfix(lod=lod, kl=f"{parts['kl']:.3f}", gain=f"{parts['gain_over_dropped']:.3f}")
        if step % config.checkpoint_every == 0 or step == total:
            if config.validation_tokens:
                gain = validate(model, net, tokens, config)
                history[-1]["validation_nll_gain"] = gain
                logger.info("step %d: held-out NLL gain over dropped %+.4f", step, gain)
                if best is None or gain > best:
                    best = gain
                    save_gistnet(net, out_dir / "best")
            save_checkpoint(net, optimizer, step, out_dir, best)
            if on_checkpoint is not None:
                on_checkpoint(net, step)
    bar.close()
    net.eval()
    return DistillResult(net, step, time.monotonic() - started, history, best)


def save_checkpoint(
    net: GistNet,
    optimizer: torch.optim.Optimizer,
    step: int,
    out_dir: Path,
    best_validation: float | None = None,
) -> None:
    save_gistnet(net, out_dir)
    tmp = out_dir / f".{STATE_FILE}.tmp"
    state = {"step": step, "optimizer": optimizer.state_dict()}
    if best_validation is not None:
        state["best_validation"] = best_validation
    torch.save(state, tmp)
    tmp.replace(out_dir / STATE_FILE)
