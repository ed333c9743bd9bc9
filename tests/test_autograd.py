"""The custom op under autograd: gradcheck in float64, double backward refused, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aropd_kernels import DoubleBackwardError, anchored_residual_kl


def _teachers(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) * 2 for _ in range(3)]


def _gradcheck(lam, clip, beta, shape=(2, 3, 6), seed=0, reduction="sum", temperature=1.0, padding=0):
    student, partial, full = _teachers(shape, seed)
    for tensor in (student, partial, full):
        tensor[..., shape[-1] - padding:] = -math.inf
    student.requires_grad_(True)
    mask = torch.ones(shape[:-1], dtype=torch.bool)
    mask.view(-1)[0] = False

    def loss(s):
        return anchored_residual_kl(s, partial, full, lam=lam, clip=clip, beta=beta, temperature=temperature,
                                    mask=mask, reduction=reduction, backend="reference")

    # finite differences need a margin from the clip's kinks; entries at -inf are never perturbed
    # meaningfully (their gradient is exactly 0 and exp(-inf + eps) = 0).
    assert torch.autograd.gradcheck(loss, (student,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
@pytest.mark.parametrize("lam", (0.0, 0.8, 1.4))
@pytest.mark.parametrize("clip", (0.5, 5.0, math.inf))
def test_gradcheck_grid(beta, lam, clip):
    _gradcheck(lam, clip, beta)


@settings(max_examples=25, deadline=None)
@given(
    lam=st.floats(0.0, 2.0),
    clip=st.one_of(st.just(math.inf), st.floats(0.1, 10.0)),
    beta=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.05, 0.95)),
    vocab=st.integers(1, 9),
    seed=st.integers(0, 1000),
    reduction=st.sampled_from(["none", "sum", "batchmean", "seq_mean"]),
    per_token_temperature=st.booleans(),
)
def test_gradcheck_property(lam, clip, beta, vocab, seed, reduction, per_token_temperature):
    temperature = (torch.rand(2, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
                   if per_token_temperature else 1.3)
    _gradcheck(lam, clip, beta, shape=(2, 3, vocab), seed=seed, reduction=reduction, temperature=temperature,
               padding=1 if vocab > 2 else 0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_double_backward_is_refused_with_a_clear_error(reduction):
    student, partial, full = _teachers((3, 5), seed=1)
    student.requires_grad_(True)
    loss = anchored_residual_kl(student, partial, full, reduction=reduction).sum()
    with pytest.raises(DoubleBackwardError, match="does not support double backward"):
        torch.autograd.grad(loss, student, create_graph=True)
    assert issubclass(DoubleBackwardError, ValueError)


def _compiled_and_eager(fn, *args):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)(*args), fn(*args)


@pytest.mark.parametrize("reduction", ["batchmean", "none", "seq_mean"])
def test_compiles_without_graph_breaks_and_matches_eager(reduction):
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 4, 16, generator=generator)
    partial, full = (torch.randn(2, 4, 33, generator=generator) for _ in range(2))
    mask = torch.rand(2, 4, generator=generator) > 0.3

    def step(head):
        logits = hidden @ head
        loss, diagnostics = anchored_residual_kl(logits, partial, full, lam=0.8, clip=2.0, mask=mask,
                                                 reduction=reduction, return_diagnostics=True)
        return loss.sum() * 1.5, diagnostics.belief_shift

    head = torch.randn(16, 33, generator=generator)
    eager_head, compiled_head = head.clone().requires_grad_(True), head.clone().requires_grad_(True)
    torch._dynamo.reset()
    compiled_loss, compiled_shift = torch.compile(step, fullgraph=True)(compiled_head)
    eager_loss, eager_shift = step(eager_head)
    compiled_loss.backward()
    eager_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_shift, eager_shift)
    torch.testing.assert_close(compiled_head.grad, eager_head.grad)
