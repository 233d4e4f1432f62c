"""LensNet's inputs for a served tiling, in and out of a preference record.

A record carries, for every unit of the served tiling (plus the trailing partial block), what
LensNet reads: its LOD, features, the retrieval prior's score and its content. Content travels as
the token ids whose mean embedding it is (raw blocks and `tokens` gists: at most the working
context's rows in ids), or as a float16 vector for gists whose rows are not token embeddings. So a
record's size depends on the budget, not on how long the session is, and the trainer rebuilds the
inputs with the embedding table alone."""

from __future__ import annotations

import numpy as np
import torch

from lens_serve.core.context import Tiling
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.lensnet import N_FEATURES, UnitInputs
from lens_serve.core.tree import LifetimeTree
from lens_serve.v1 import lens_serve_pb2 as pb

PARTIAL_INDEX = -1
"""UnitInput.index of the trailing partial block."""


class UnitRecordError(ValueError):
    """The record's units cannot be turned back into LensNet inputs; the message says why."""


def encode_units(
    tree: LifetimeTree, tiling: Tiling, inputs: UnitInputs, prior: np.ndarray
) -> list[pb.UnitInput]:
    """One UnitInput per LensNet input of `tiling` (units, then the partial block): `inputs` is
    `unit_inputs(tree, tiling, ...)`, prior (U,) the retrieval prior of its units."""
    features = inputs.features.numpy()  # (U', F)
    token_gists = tree.gistnet.config.kind == "tokens"
    b = tree.block_size
    out = []
    for k in range(len(inputs)):
        unit = tiling.units[k] if k < len(tiling.units) else None
        message = pb.UnitInput(
            lod=unit[0] if unit is not None else 0,
            index=unit[1] if unit is not None else PARTIAL_INDEX,
            features=features[k].tolist(),
            prior=float(prior[k]) if unit is not None else 0.0,
        )
        if unit is None:  # the trailing partial block's tokens
            message.content_token_ids.extend(tree.tokens(tiling.loose_start, tiling.lifetime))
        elif unit[0] <= 0:  # a raw or recalled block
            message.content_token_ids.extend(tree.tokens(unit[1] * b, (unit[1] + 1) * b))
        elif token_gists:
            ids = tree.gist_token_ids(unit[0], np.array([unit[1]]))[0]  # (R,)
            message.content_token_ids.extend(ids.tolist())
        else:
            vector = inputs.content[k].to(torch.float16).numpy().astype("<f2")  # (D,)
            message.content_f16 = vector.tobytes()
        out.append(message)
    return out


def decode_units(units: list[pb.UnitInput], table: EmbeddingTable) -> tuple[UnitInputs, np.ndarray]:
    """(LensNet inputs, (U',) prior) rebuilt from a record's units; raises UnitRecordError."""
    if not units:
        raise UnitRecordError("units: the record has none")
    d = table.hidden_size
    content = torch.zeros(len(units), d)  # (U', D)
    for k, unit in enumerate(units):
        if len(unit.features) != N_FEATURES:
            raise UnitRecordError(
                f"units[{k}].features: {len(unit.features)} values, LensNet reads {N_FEATURES}"
            )
        if unit.content_token_ids:
            ids = torch.tensor(list(unit.content_token_ids), dtype=torch.long)  # (T,)
            if int(ids.min()) < 0 or int(ids.max()) >= table.vocab_size:
                raise UnitRecordError(
                    f"units[{k}].content_token_ids: an id outside the vocabulary of "
                    f"{table.vocab_size}"
                )
            content[k] = table(ids).float().mean(dim=0)
        elif len(unit.content_f16) == 2 * d:
            content[k] = torch.from_numpy(np.frombuffer(unit.content_f16, "<f2").astype(np.float32))
        else:
            raise UnitRecordError(
                f"units[{k}]: no content_token_ids and content_f16 of "
                f"{len(unit.content_f16)} bytes, not {2 * d} (hidden size {d})"
            )
    lods = torch.tensor([max(u.lod, 0) for u in units], dtype=torch.long)  # (U',)
    features = torch.tensor([list(u.features) for u in units], dtype=torch.float32)  # (U', F)
    prior = np.array([u.prior for u in units], dtype=np.float32)  # (U',)
    return UnitInputs(content, lods, features), prior
