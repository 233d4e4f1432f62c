"""The composition root: the one place that builds the service and its servicers from settings.
The production server, the in-process stack (integration tests) and the benches all use it."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import platform
from collections.abc import Sequence

import numpy as np
from redis.asyncio import Redis

from lens_serve import metrics
from lens_serve.assets.model_dirs import resolve_model
from lens_serve.core.allocator import FocusConfig
from lens_serve.core.counterfactual import UnitChoice
from lens_serve.core.embedding import EmbeddingTable
from lens_serve.core.gistnet import GistNet, build_gistnet, gist_config
from lens_serve.core.tree import LifetimeTree
from lens_serve.engine.protocol import Engine
from lens_serve.service.config import Settings
from lens_serve.service.hot_swap import WeightStore
from lens_serve.service.lens_service import LensService
from lens_serve.service.prewarm import Prewarmer
from lens_serve.service.servicer import LensAdminServicer, LensServeServicer
from lens_serve.service.validation import RequestValidator
from lens_serve.shadow.scorer import ShadowConfig, ShadowScorer
from lens_serve.store.preferences import PreferenceLog
from lens_serve.store.registry import current_gistnet
from lens_serve.store.sessions import SessionStore

logger = logging.getLogger(__name__)


def package_version() -> str:
    try:
        return importlib.metadata.version("lens-serve")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "(not installed)"


def record_build_info(settings: Settings) -> None:
    """`lens_build_info` = 1 for this process's version, served model and Python."""
    metrics.BUILD_INFO.labels(package_version(), settings.model, platform.python_version()).set(1)


def new_tree(
    gistnet: GistNet, table: EmbeddingTable, token_ids: Sequence[int] | np.ndarray
) -> LifetimeTree:
    tree = LifetimeTree(gistnet, table)
    tree.append(token_ids)
    return tree


def assemble_service(
    settings: Settings,
    engine: Engine,
    redis: Redis,
    *,
    table: EmbeddingTable,
    gistnet: GistNet,
    weights: WeightStore,
) -> LensService:
    """A service over already-built parts (nothing started, nothing read from Redis)."""
    make_tree = functools.partial(new_tree, gistnet, table)
    shadow = None
    if settings.shadow_rate > 0:
        shadow = ShadowScorer(
            engine,
            PreferenceLog(redis, maxlen=settings.prefs_maxlen),
            ShadowConfig(
                rate=settings.shadow_rate,
                queue_size=settings.shadow_queue,
                units=UnitChoice.split(settings.shadow_units),
                random_variants=settings.shadow_variants,
                guided_share=settings.shadow_guided_share,
                seed=settings.lens_seed,
            ),
            model=settings.model,
            make_tree=make_tree,
        )
    return LensService(
        settings=settings,
        engine=engine,
        sessions=SessionStore(
            redis, settings.session_ttl_s, settings.max_session_tokens, model=settings.model
        ),
        weights=weights,
        make_tree=make_tree,
        gistnet_version=gistnet.version,
        validator=RequestValidator(settings, engine, table.vocab_size, gistnet.config.frame_rows),
        prewarmer=Prewarmer(engine),
        shadow=shadow,
    )


async def build_service(settings: Settings, engine: Engine, redis: Redis) -> LensService:
    """The served model's embedding table, the GistNet (a published one if it fits this server's
    trees, else the configured kind), the current LensNet, and the running service."""
    record_build_info(settings)
    model_dir = resolve_model(settings.model, settings.models_dir)
    table = EmbeddingTable.from_checkpoint(model_dir)
    configured = build_gistnet(
        gist_config(
            table,
            kind=settings.gist_kind,  # type: ignore[arg-type]  # validated by Settings
            block_size=settings.block_size,
            rows=settings.gist_rows,
        ),
        table,
    )
    published = await current_gistnet(
        redis, table.hidden_size, settings.block_size, settings.gist_rows
    )
    gistnet = published or configured
    logger.info("GistNet %s (%s)", gistnet.version, "published" if published else "configured")
    weights = WeightStore(
        redis,
        table.hidden_size,
        settings.lens_seed,
        FocusConfig(),
        retry_seconds=settings.lens_retry_seconds,
        retry_max_seconds=settings.lens_retry_max_seconds,
    )
    await weights.start()
    service = assemble_service(
        settings, engine, redis, table=table, gistnet=gistnet, weights=weights
    )
    service.start_background()
    return service


def build_servicers(service: LensService) -> tuple[LensServeServicer, LensAdminServicer]:
    return LensServeServicer(service), LensAdminServicer(service)
