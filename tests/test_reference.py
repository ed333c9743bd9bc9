"""The reference backend in float64 against the gold, and the SPEC §5 edge cases it must honour."""

from __future__ import annotations

import math

import pytest
import torch

from aropd_kernels import anchored_residual_kl, anchored_residual_target
from conftest import assert_loss_close, gold

BETAS = (1.0, 0.0, 0.5)
CLIPS = (math.inf, 0.3)


def _logits(*shape, seed=0, dtype=torch.float64, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).mul(scale).to(dtype)


def _run(student, partial, full, **kwargs):
    student = student.clone().requires_grad_(True)
    loss = anchored_residual_kl(student, partial, full, reduction="sum", backend="reference", **kwargs)
    loss.backward()
    per_token, diagnostics = anchored_residual_kl(
        student.detach(), partial, full, reduction="none", return_diagnostics=True, backend="reference", **kwargs)
    return per_token, diagnostics, student.grad


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("lam", (0.0, 0.8, 1.4))
def test_float64_matches_gold(beta, clip, lam):
    student, partial, full = _logits(5, 37, seed=1), _logits(5, 37, seed=2), _logits(5, 37, seed=3)
    per_token, diagnostics, grad = _run(student, partial, full, lam=lam, clip=clip, beta=beta)
    expected = gold(student, partial, full, lam=lam, clip=clip, beta=beta, temperature=1.0)
    torch.testing.assert_close(per_token, expected.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.stack(list(diagnostics[:4])).double(), expected.diagnostics, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected.grad, rtol=1e-9, atol=1e-12)


def test_lam_zero_is_the_partial_teacher_and_lam_one_unclipped_is_the_full_teacher():
    partial, full = _logits(4, 50, seed=4), _logits(4, 50, seed=5)
    torch.testing.assert_close(anchored_residual_target(partial, full, lam=0.0), torch.log_softmax(partial, -1))
    torch.testing.assert_close(anchored_residual_target(partial, full, lam=1.0, clip=math.inf),
                               torch.log_softmax(full, -1))


def test_unclipped_target_is_the_geometric_interpolation():
    partial, full, lam = _logits(3, 40, seed=6), _logits(3, 40, seed=7), 0.35
    expected = torch.log_softmax((1 - lam) * torch.log_softmax(partial, -1) + lam * torch.log_softmax(full, -1), -1)
    torch.testing.assert_close(anchored_residual_target(partial, full, lam=lam, clip=math.inf), expected)


def test_target_takes_per_token_temperature():
    partial, full = _logits(2, 3, 9, seed=8), _logits(2, 3, 9, seed=9)
    temperature = torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.7, 1.0]], dtype=torch.float64)
    actual = anchored_residual_target(partial, full, lam=0.6, clip=0.5, temperature=temperature)
    for index in [(0, 0), (1, 1)]:
        row = anchored_residual_target(partial[index], full[index], lam=0.6, clip=0.5, temperature=temperature[index].item())
        torch.testing.assert_close(actual[index], row)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
def test_negative_infinity_padding_never_gives_nan(beta, dtype):
    student, partial, full = (_logits(4, 20, seed=seed, dtype=dtype) for seed in (10, 11, 12))
    for tensor in (student, partial, full):
        tensor[:, -7:] = -math.inf
    per_token, diagnostics, grad = _run(student, partial, full, lam=1.0, clip=math.inf, beta=beta)
    assert torch.isfinite(per_token).all() and torch.isfinite(grad).all()
    assert torch.isfinite(torch.stack(list(diagnostics[:4]))).all()
    assert torch.all(grad[:, -7:] == 0)
    expected = gold(student, partial, full, lam=1.0, clip=math.inf, beta=beta, temperature=1.0)
    assert_loss_close(per_token, expected.loss)


def test_lam_zero_with_a_token_only_the_full_teacher_forbids_is_finite():
    student, partial, full = _logits(2, 6, seed=13), _logits(2, 6, seed=14), _logits(2, 6, seed=15)
    full[:, 2] = -math.inf
    per_token, _, grad = _run(student, partial, full, lam=0.0, clip=math.inf, beta=1.0)
    assert torch.isfinite(per_token).all() and torch.isfinite(grad).all()
    expected = gold(student, partial, full, lam=0.0, clip=math.inf, beta=1.0, temperature=1.0)
    torch.testing.assert_close(per_token, expected.loss)


def test_reverse_kl_on_a_token_the_target_forbids_is_infinite_and_its_gradient_not_finite():
    student, partial, full = _logits(3, 8, seed=16), _logits(3, 8, seed=17), _logits(3, 8, seed=18)
    partial[1, 4] = -math.inf  # the anchor forbids a token the student may still pick
    per_token, _, grad = _run(student, partial, full, lam=1.0, clip=5.0, beta=1.0)
    assert per_token[1] == math.inf and torch.isfinite(per_token[[0, 2]]).all()
    assert not torch.isfinite(grad[1]).all(), "documented: the gradient of an infinite row is not finite"
    assert torch.isfinite(grad[[0, 2]]).all()
    forward_kl, _, forward_grad = _run(student, partial, full, lam=1.0, clip=5.0, beta=0.0)
    assert torch.isfinite(forward_kl).all() and torch.isfinite(forward_grad).all()


@pytest.mark.parametrize("beta", BETAS)
def test_nan_propagates_to_its_row_only(beta):
    student, partial, full = _logits(3, 8, seed=19), _logits(3, 8, seed=20), _logits(3, 8, seed=21)
    full[2, 5] = math.nan
    per_token, _, _ = _run(student, partial, full, lam=0.0, clip=5.0, beta=beta)
    assert torch.isnan(per_token[2]) and torch.isfinite(per_token[:2]).all()


def test_single_entry_vocabulary_has_zero_loss_and_gradient():
    student, partial, full = _logits(3, 1, seed=22), _logits(3, 1, seed=23), _logits(3, 1, seed=24)
    for beta in BETAS:
        per_token, diagnostics, grad = _run(student, partial, full, beta=beta)
        assert torch.all(per_token == 0) and torch.all(grad == 0)
        assert torch.all(diagnostics.student_entropy == 0)


def test_zero_rows():
    empty = torch.zeros(0, 11, dtype=torch.float64)
    student = empty.clone().requires_grad_(True)
    for reduction in ("sum", "batchmean"):
        loss = anchored_residual_kl(student, empty, empty, reduction=reduction)
        assert loss.item() == 0
    loss.backward()
    assert student.grad.shape == (0, 11)
    assert anchored_residual_kl(empty, empty, empty, reduction="none").shape == (0,)


def test_largest_vocabulary_in_float32_matches_gold():
    vocab = 262_208
    student, partial, full = (_logits(2, vocab, seed=seed, dtype=torch.float32) for seed in (25, 26, 27))
    per_token, diagnostics, _ = _run(student, partial, full, lam=1.0, clip=5.0, beta=1.0)
    expected = gold(student, partial, full, lam=1.0, clip=5.0, beta=1.0, temperature=1.0)
    assert_loss_close(per_token, expected.loss)
    for name, actual, wanted in zip(diagnostics._fields, diagnostics, expected.diagnostics):
        assert_loss_close(actual, wanted, name)
