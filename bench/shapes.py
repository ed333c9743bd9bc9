"""Vocabulary sizes of real models and the token counts each sweep runs them at."""

from __future__ import annotations

from typing import NamedTuple


class Shape(NamedTuple):
    model: str
    n_tokens: int
    vocab: int
    hidden: int | None = None  # the lm_head's input size H, for the providers that start from hidden states


# Output vocabulary (lm_head rows, padding included) from each model's config.json.
MODEL_VOCAB = {
    "Qwen2.5-0.5B": 151936,
    "Qwen2.5-7B": 152064,
    "Qwen3": 151936,
    "Llama-3": 128256,
    "Gemma-3": 262208,
}
SWEEP_MODELS = ("Qwen2.5-7B", "Qwen3", "Llama-3", "Gemma-3")  # the default sweeps' (Qwen3 has Qwen2.5-0.5B's V)
# Hidden size H (hidden_size in config.json) where the benchmark runs the hidden-state providers.
MODEL_HIDDEN = {
    "Qwen2.5-0.5B": 896,
    "Qwen2.5-7B": 3584,
    "Llama-3": 4096,  # Llama-3-8B
}

CUDA_TOKENS = (1024, 4096, 16384)
# On two CPU cores the eager provider spends roughly 50-100 ns per N×V element and call (measured
# here), so the CPU sweeps keep N×V within a few 10^7 elements per shape.
CPU_TOKENS = (32, 128)
QUICK_MODELS = ("Qwen2.5-7B", "Gemma-3")  # the two ends of the registry's vocabulary sizes
QUICK_TOKENS = (16, 64)


def model_name(name: str) -> str:
    """The registry's spelling of a model name, matched case-insensitively."""
    for known in MODEL_VOCAB:
        if known.lower() == name.lower():
            return known
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_VOCAB)} or pass --vocab V.")


def custom_model(vocab: int) -> str:
    return f"vocab-{vocab}"


def sweep(models: list[str], vocabs: list[int], tokens: list[int], hidden: int | None = None) -> list[Shape]:
    """Every (model, N) pair; ``vocabs`` adds vocabulary sizes outside the registry, with hidden size
    ``hidden`` (which also replaces the registry's when given)."""
    named = [(model_name(m), MODEL_VOCAB[model_name(m)], hidden or MODEL_HIDDEN.get(model_name(m))) for m in models]
    named += [(custom_model(v), v, hidden) for v in vocabs]
    return [Shape(model, n, vocab, size) for model, vocab, size in named for n in tokens]
