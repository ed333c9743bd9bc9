"""Hypothesis strategies for AR-OPD problems: shapes, views, -inf padding, masks, weights, scalars."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from hypothesis import strategies as st

VOCAB_SIZES = (1, 2, 3, 7, 31, 64, 65, 127, 257, 1000, 1031)


class Problem(NamedTuple):
    student: torch.Tensor
    partial: torch.Tensor
    full: torch.Tensor
    lam: float
    clip: float
    beta: float
    temperature: float | torch.Tensor
    mask: torch.Tensor | None
    weights: torch.Tensor | None


def _view(base: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``base`` laid out as a contiguous tensor, a row slice or a transposed view."""
    if layout == "contiguous":
        return base.clone()
    if layout == "sliced":  # a [:, :-1]-style slice of a wider, longer buffer: non-mergeable rows
        padded = torch.zeros(*base.shape[:-2], base.shape[-2] + 1, base.shape[-1] + 3, dtype=base.dtype)
        padded[..., : base.shape[-2], : base.shape[-1]] = base
        return padded[..., : base.shape[-2], : base.shape[-1]]
    return base.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride 1 along rows, not V


def _batch_shape(draw, max_rows: int) -> tuple[int, ...]:
    """Mostly two to ``max_rows`` rows, flat or [2, T]; the edge shapes (no row dimension, one row,
    no rows) one draw in eight, so that they are tested without crowding out the rows that matter."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.sampled_from([(), (1,), (0,)]))
    rows = draw(st.integers(min(2, max_rows), max_rows))
    return (2, rows // 2) if rows % 2 == 0 and draw(st.booleans()) else (rows,)


def _ban_tokens(draw, tensor: torch.Tensor, allowed: int, generator: torch.Generator) -> None:
    """-inf at random positions of about half the rows of ``tensor``, among its first ``allowed``
    tokens (the rest is padding): one token per row or about a third of them. Every row keeps one
    allowed token, so each input's log-softmax is defined; the target may still forbid every token."""
    kind = draw(st.sampled_from(["none", "one", "some"]))
    if kind == "none" or allowed < 2 or tensor.numel() == 0:
        return
    rows = tensor[..., :allowed].reshape(-1, allowed)
    if kind == "one":
        banned = torch.zeros(rows.shape, dtype=torch.bool)
        banned[torch.arange(rows.shape[0]), torch.randint(0, allowed, (rows.shape[0],), generator=generator)] = True
    else:
        banned = torch.rand(rows.shape, generator=generator) < 0.3
    banned &= (torch.rand(rows.shape[0], 1, generator=generator) < 0.5)  # about half the rows
    keep = torch.randint(0, allowed, (rows.shape[0],), generator=generator)
    banned[torch.arange(rows.shape[0]), keep] = False
    tensor[..., :allowed] = rows.masked_fill(banned, -math.inf).view(tensor[..., :allowed].shape)


@st.composite
def problems(draw, dtypes=(torch.float32, torch.bfloat16, torch.float16), max_rows: int = 6,
             vocab_sizes=VOCAB_SIZES) -> Problem:
    """An AR-OPD problem: logits of scale up to 50 at temperatures down to 0.05 (log-probabilities far
    below float32's and float64's smallest exp), -inf padding in all three inputs and -inf at random
    positions of each (the rows whose divergence is +inf included), views, masks, weights, scalars."""
    vocab = draw(st.sampled_from(vocab_sizes))
    batch_shape = _batch_shape(draw, max_rows)
    dtype = draw(st.sampled_from(dtypes))
    teacher_dtype = draw(st.sampled_from([dtype, torch.float32]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 4.0, 16.0, 50.0]))
    generator = torch.Generator().manual_seed(seed)
    shape = (*batch_shape, vocab)

    def logits():
        return torch.randn(shape, generator=generator, dtype=torch.float64) * scale

    student, partial = logits(), logits()
    full = partial + draw(st.sampled_from([0.5, 3.0])) * logits()  # correlated with the anchor
    padding = draw(st.integers(0, min(3, vocab - 1)))
    if padding:  # vocabulary padding: -inf in all three
        for tensor in (student, partial, full):
            tensor[..., vocab - padding:] = -math.inf
    for tensor in (student, partial, full):  # tokens one view bans (infinite KL rows included)
        _ban_tokens(draw, tensor, vocab - padding, generator)
    layouts = ["contiguous", "sliced", "transposed"] if len(batch_shape) >= 1 else ["contiguous"]
    layout = [draw(st.sampled_from(layouts)) for _ in range(3)]  # each input its own view

    lam = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 2.0)))
    clip = draw(st.one_of(st.just(math.inf), st.floats(0.1, 10.0)))
    beta = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.05, 0.95)))
    temperature = draw(st.sampled_from([1.0, 0.7, 1.5, 0.2, 0.05, "per-token"]))
    if temperature == "per-token":
        temperature = 0.05 + 1.95 * torch.rand(batch_shape, generator=generator)
    mask = torch.rand(batch_shape, generator=generator) > 0.3 if draw(st.booleans()) else None
    weights = torch.rand(batch_shape, generator=generator) * 2 if draw(st.booleans()) else None
    return Problem(
        _view(student.to(dtype), layout[0]),
        _view(partial.to(teacher_dtype), layout[1]),
        _view(full.to(teacher_dtype), layout[2]),
        lam, clip, beta, temperature, mask, weights,
    )


class LinearProblem(NamedTuple):
    """Inputs of fused_linear_anchored_residual_kl and the keywords drawn for it."""

    student_hidden: torch.Tensor  # [..., H_s]
    student_weight: torch.Tensor  # [V, H_s]
    partial_hidden: torch.Tensor  # [..., H_t]
    full_hidden: torch.Tensor
    teacher_weight: torch.Tensor  # [V, H_t]
    kwargs: dict  # every other keyword, backend excepted
    slab_elements: int | None  # weight slab size to patch in (small: many slabs), or None


@st.composite
def linear_problems(draw, dtypes=(torch.float32, torch.bfloat16), max_rows: int = 8) -> LinearProblem:
    """Hidden states and lm_head weights whose logits reach magnitudes of about 20, with biases (vocabulary
    padding at -inf in both), logit scale and softcap, teacher H different from the student's, chunk
    sizes that do not divide N, masks or labels, weights, temperatures and every reduction."""
    vocab = draw(st.sampled_from((1, 2, 7, 31, 65, 127)))
    batch_shape = draw(st.sampled_from([(0,), (1,), (3,), (max_rows,), (2, max_rows // 2), (3, 2)]))
    student_size = draw(st.sampled_from((1, 3, 7, 13)))
    teacher_size = draw(st.sampled_from((student_size, 5, 16)))
    dtype = draw(st.sampled_from(dtypes))
    teacher_dtype = draw(st.sampled_from([dtype, torch.float32]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logit_size = draw(st.sampled_from([1.0, 5.0, 20.0]))  # the logits' standard deviation

    def normal(*shape, std=1.0):
        return torch.randn(shape, generator=generator, dtype=torch.float64) * std

    student_hidden = normal(*batch_shape, student_size)
    partial_hidden = normal(*batch_shape, teacher_size)
    full_hidden = partial_hidden + normal(*batch_shape, teacher_size, std=draw(st.sampled_from([0.3, 1.0])))
    student_weight = normal(vocab, student_size, std=logit_size / math.sqrt(student_size))
    teacher_weight = normal(vocab, teacher_size, std=logit_size / math.sqrt(teacher_size))
    kwargs = {}
    if draw(st.booleans()):
        kwargs["student_bias"] = normal(vocab).to(dtype)
    if draw(st.booleans()):
        kwargs["teacher_bias"] = normal(vocab).to(teacher_dtype)
    padding = draw(st.integers(0, min(2, vocab - 1)))
    if padding and len(kwargs) == 2:  # vocabulary padding: -inf in both biases
        for bias in kwargs.values():
            bias[vocab - padding:] = -math.inf
    kwargs["logit_scale"] = draw(st.sampled_from([1.0, 0.5, 2.5]))
    kwargs["logit_softcap"] = draw(st.sampled_from([None, 3.0, 30.0]))
    kwargs["chunk_size"] = draw(st.sampled_from([None, 1, 2, 3, 5, 64]))
    kwargs["lam"] = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 2.0)))
    kwargs["clip"] = draw(st.one_of(st.just(math.inf), st.floats(0.1, 10.0)))
    kwargs["beta"] = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.05, 0.95)))
    temperature = draw(st.sampled_from([1.0, 0.7, 1.5, "per-token"]))
    kwargs["temperature"] = 0.5 + torch.rand(batch_shape, generator=generator) if temperature == "per-token" \
        else temperature
    skipping = draw(st.sampled_from(["none", "mask", "labels"]))
    if skipping == "mask":
        kwargs["mask"] = torch.rand(batch_shape, generator=generator) > 0.3
    elif skipping == "labels":
        labels = torch.randint(0, vocab, batch_shape, generator=generator)
        kwargs["labels"] = labels.masked_fill(torch.rand(batch_shape, generator=generator) < 0.3, -100)
    if draw(st.booleans()):
        kwargs["weights"] = torch.rand(batch_shape, generator=generator) * 2
    reductions = ["none", "sum", "batchmean"] + (["seq_mean"] if len(batch_shape) == 2 else [])
    kwargs["reduction"] = draw(st.sampled_from(reductions))
    if kwargs["reduction"] in ("batchmean", "seq_mean") and draw(st.booleans()):
        kwargs["num_items_in_batch"] = draw(st.sampled_from([3, 11]))
    slab_elements = draw(st.sampled_from([None, 2 * max(student_size, teacher_size)]))
    return LinearProblem(student_hidden.to(dtype), student_weight.to(dtype), partial_hidden.to(teacher_dtype),
                         full_hidden.to(teacher_dtype), teacher_weight.to(teacher_dtype), kwargs, slab_elements)
