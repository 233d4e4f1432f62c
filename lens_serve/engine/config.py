"""How to start an engine: `EngineConfig`. Free of torch and vLLM so that settings can build it
cheaply (`lens-serve --help` imports this)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class EngineConfig:
    """How to start vLLM. Only `model` is required."""

    model: str
    """Local model directory (config.json, safetensors, tokenizer). Hubs are never contacted."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Weights and activations dtype; prompt rows are cast to it."""
    max_model_len: int = 4096
    """Positions per request: prompt rows plus generated tokens."""
    kv_cache_gib: float = 2.0
    """KV-cache size in GiB. Always used on CPU; on GPU only when gpu_memory_utilization is None.
    An operator-set VLLM_CPU_KVCACHE_SPACE (vLLM's legacy knob, whole GiB) overrides it on CPU."""
    enforce_eager: bool = False
    """Skip torch.compile / CUDA graphs. Tiny model on 2 CPU cores: start-up ~20-27 s against
    ~27 s (warm compile cache) or ~47 s (cold); decode ~100-160 against ~150-270 tokens/s."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes; works for prompt embeddings too."""
    kv_block_size: int | None = None
    """Tokens per KV-cache block; None keeps vLLM's default (128 on CPU, 16 on GPU). The prefix
    cache reuses whole blocks only, so a turn recomputes the rows after the last full block."""
    max_num_seqs: int = 16
    """Most requests decoded together in one step."""
    max_num_batched_tokens: int | None = None
    """Most rows one engine step processes (longer prefills are chunked); None keeps vLLM's
    default. A request that arrives waits for the running step to end."""
    long_prefill_tokens: int | None = None
    """Most rows of one prefill in a step shared with other requests (vLLM's
    long_prefill_token_threshold); None = no cap. vLLM gives running requests the step's rows
    first, so without this cap a chunked background prefill takes every step until it is done
    and a user request arriving meanwhile waits for all of it."""
    seed: int = 0
    """vLLM's global seed (per-request sampling seeds are in GenerationParams)."""
    gpu_memory_utilization: float | None = 0.85
    """GPU only: fraction of GPU memory vLLM may take. None sizes the KV cache by kv_cache_gib."""
    scheduling_policy: Literal["fcfs", "priority"] = "priority"
    """"priority" makes the `priority` argument count (lower runs first, and is preempted last;
    vLLM ignores it under "fcfs"), so background scoring (priority > 0) queues behind serving."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("EngineConfig.model: must name a model directory")
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype: must be one of {sorted(DTYPES)}")
        if self.max_model_len < 2:
            raise ValueError("EngineConfig.max_model_len: must be at least 2")
        if not self.kv_cache_gib > 0:
            raise ValueError("EngineConfig.kv_cache_gib: must be positive")
        if self.max_num_seqs < 1:
            raise ValueError("EngineConfig.max_num_seqs: must be at least 1")
        for name in ("max_num_batched_tokens", "long_prefill_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"EngineConfig.{name}: must be positive")
        if self.kv_block_size is not None and self.kv_block_size < 1:
            raise ValueError("EngineConfig.kv_block_size: must be positive")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("EngineConfig.gpu_memory_utilization: must be in (0, 1]")
