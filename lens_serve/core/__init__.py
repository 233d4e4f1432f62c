"""The model-side core: lifetime tree, gists, LensNet, working contexts, policies, allocator and
assembly. Imports torch, numpy and safetensors only (never grpc, redis or vllm)."""
