"""Teacher backends: turn token sequences into next-token targets (vLLM for speed, transformers for exactness)."""
