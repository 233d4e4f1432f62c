"""GistNet and LensNet save -> load give bit-identical outputs; versions name exact weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lens_serve.core import checkpoint
from lens_serve.core.gist_kinds import GIST_KINDS, GistKind
from lens_serve.core.gistnet import GistNetConfig, build_gistnet, load_gistnet, save_gistnet
from lens_serve.core.lensnet import N_FEATURES, LensNet, LensNetConfig, load_lensnet, save_lensnet
from tests.core_helpers import HIDDEN, random_lensnet, random_table


@pytest.mark.parametrize(
    ("kind", "separator"),
    [(kind, -1) for kind in GIST_KINDS] + [("tokens", 7), ("transformer", 7)],
)
def test_gistnet_save_load_gives_identical_outputs(
    kind: GistKind, separator: int, tmp_path: Path
) -> None:
    config = GistNetConfig(
        kind=kind, block_size=4, rows=2, hidden_size=HIDDEN, width=16, separator_id=separator
    )
    net = build_gistnet(config, random_table())
    save_gistnet(net, tmp_path)
    loaded = load_gistnet(tmp_path)
    ids = torch.randint(0, 100, (5, 4))
    embeds = torch.randn(5, 4, HIDDEN)
    a, b = net(ids, embeds), loaded(ids, embeds)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.token_ids, b.token_ids)
    assert loaded.version == net.version


def test_lensnet_save_load_gives_identical_scores(tmp_path: Path) -> None:
    net = random_lensnet(4)
    save_lensnet(net, tmp_path)
    loaded = load_lensnet(tmp_path)
    args = (torch.randn(2, 7, HIDDEN), torch.randint(0, 3, (2, 7)), torch.rand(2, 7, N_FEATURES))
    valid = torch.ones(2, 7, dtype=torch.bool)
    assert torch.equal(net(*args, valid), loaded(*args, valid))
    assert loaded.version == net.version


def test_lensnet_init_is_deterministic_from_its_seed() -> None:
    config = LensNetConfig(hidden_size=HIDDEN, width=16, heads=2)
    assert LensNet(config).version == LensNet(config).version
    other = LensNetConfig(hidden_size=HIDDEN, width=16, heads=2, seed=1)
    assert LensNet(other).version != LensNet(config).version


def test_loading_weights_of_another_shape_is_rejected() -> None:
    small = LensNet(LensNetConfig(hidden_size=HIDDEN, width=16, heads=2))
    big = LensNet(LensNetConfig(hidden_size=HIDDEN, width=32, heads=2))
    with pytest.raises(RuntimeError):
        checkpoint.load_state(big, checkpoint.weights_bytes(small))


def test_config_with_unknown_keys_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown"):
        checkpoint.config_from_dict(LensNetConfig, {"hidden_size": 8, "magic": 1})
