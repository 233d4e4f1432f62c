"""The engine boundary: `protocol` (what the service needs from an engine, and its value types)
and `vllm` (the adapter to vLLM's AsyncLLM)."""
