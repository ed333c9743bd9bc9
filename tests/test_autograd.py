"""The custom op under autograd: gradcheck in float64, double backward refused, torch.compile."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aropd_kernels import DoubleBackwardError, anchored_residual_kl
from conftest import gold


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


# --- the stored gradient under autograd: accumulation, retained graphs, incoming gradients ----------


def _logits(shape=(4, 37), seed=3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=generator) * 3).to(dtype) for _ in range(3)]


def test_backward_with_retain_graph_accumulates_one_gradient_per_call():
    student, partial, full = _logits()
    leaf = student.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(anchored_residual_kl(leaf, partial, full), leaf)
    loss = anchored_residual_kl(leaf, partial, full)
    for calls in (1, 2, 3):
        loss.backward(retain_graph=True)
        torch.testing.assert_close(leaf.grad, calls * expected, rtol=0, atol=0)


def test_two_losses_on_the_same_logits_each_contribute_theirs():
    student, partial, full = _logits()
    leaf = student.clone().requires_grad_(True)
    kwargs = [dict(beta=1.0), dict(beta=0.0, lam=0.5)]
    expected = [torch.autograd.grad(anchored_residual_kl(leaf, partial, full, **k), leaf)[0] for k in kwargs]
    first, second = (anchored_residual_kl(leaf, partial, full, **k) for k in kwargs)
    first.backward(retain_graph=True)
    second.backward(retain_graph=True)
    torch.testing.assert_close(leaf.grad, expected[0] + expected[1])
    (first + second).backward()  # the engine sums both branches, then accumulates into .grad
    torch.testing.assert_close(leaf.grad, 2 * (expected[0] + expected[1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_an_incoming_gradient_is_applied_in_float32_and_rounded_once(dtype):
    """(loss / 3).backward(): the stored gradient times 1/3 in float32, rounded once to the student's
    dtype; rounding 1/3 to bfloat16 first (0.3340) would bias every entry by +0.2 %."""
    student, partial, full = _logits((64, 300), dtype=dtype)
    leaf = student.clone().requires_grad_(True)
    (stored,) = torch.autograd.grad(anchored_residual_kl(leaf, partial, full), leaf)
    (scaled,) = torch.autograd.grad(anchored_residual_kl(leaf, partial, full) / 3, leaf)
    assert torch.equal(scaled, (stored.float() * torch.tensor(1 / 3)).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_per_token_incoming_gradients_are_applied_in_float32(dtype):
    student, partial, full = _logits((2, 5, 300), dtype=dtype)
    leaf = student.clone().requires_grad_(True)
    token_weights = torch.rand(2, 5, generator=torch.Generator().manual_seed(4)) * 3
    (stored,) = torch.autograd.grad(anchored_residual_kl(leaf, partial, full, reduction="none").sum(), leaf)
    per_token = anchored_residual_kl(leaf, partial, full, reduction="none")
    (weighted,) = torch.autograd.grad((per_token * token_weights).sum(), leaf)
    assert torch.equal(weighted, (stored.float() * token_weights.unsqueeze(-1)).to(dtype))


def test_float16_gradient_survives_a_gradscaler_loss_scale():
    """float16 logits under a loss scale S: the gradient is kept in float32 until backward, so that
    entries below float16's range before scaling (p of unlikely tokens over N) are not flushed."""
    vocab, rows, scale = 2000, 256, 2.0**16
    generator = torch.Generator().manual_seed(5)
    student = (torch.randn(rows, vocab, generator=generator) * 4).half()
    partial, full = (torch.randn(rows, vocab, generator=generator) * 4 for _ in range(2))
    leaf = student.clone().requires_grad_(True)
    (anchored_residual_kl(leaf, partial, full) * scale).backward()  # what GradScaler.scale(loss) does
    expected = gold(student.double(), partial, full, lam=1.0, clip=5.0, beta=1.0, temperature=1.0).grad
    expected = (expected / rows * scale).half()  # the exact gradient, scaled, rounded once
    representable = expected != 0
    assert (leaf.grad[representable] != 0).all(), "scaled entries that float16 holds were flushed to zero"
    assert (leaf.grad.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2**-10


def test_the_custom_op_declares_no_mutation_and_inplace_calls_bypass_it():
    schema = torch.ops.aropd.anchored_residual_kl.default._schema
    assert all(arg.alias_info is None or not arg.alias_info.is_write for arg in schema.arguments)
    student, partial, full = _logits()
    logits = student.clone().requires_grad_(True) * 1
    with mock.patch("aropd_kernels.functional.anchored_residual_kl_op",
                    side_effect=AssertionError("the mutation-free op ran for inplace_grad=True")):
        anchored_residual_kl(logits, partial, full, inplace_grad=True).backward()


def test_compiles_with_dynamic_shapes_and_symbolic_floats():
    """torch.compile(dynamic=True) turns Python floats into symbolic ones: lam, clip and the temperature
    must still validate and reach the kernel, for every value, without graph breaks."""
    student, partial, full = _logits((2, 4, 33))

    def step(logits, lam, clip, temperature):
        return anchored_residual_kl(logits, partial, full, lam=lam, clip=clip, temperature=temperature)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for lam, clip, temperature in ((0.8, 2.0, 1.3), (0.4, 5.0, 0.7)):
        eager_leaf, compiled_leaf = (student.clone().requires_grad_(True) for _ in range(2))
        eager_loss, compiled_loss = step(eager_leaf, lam, clip, temperature), compiled(compiled_leaf, lam, clip,
                                                                                    temperature)
        eager_loss.backward()
        compiled_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss)
        torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)
