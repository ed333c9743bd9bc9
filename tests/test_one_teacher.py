"""One teacher (OPD, GKD, self-distillation) and the labels' log-probabilities, every backend against
the float64 gold."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aropd_kernels import anchored_residual_kl, distillation_divergence
from conftest import assert_grad_close, assert_loss_close, device_for, gold, gold_token_logprobs
from strategies import problems


def _flat(tensor, vocab=None):
    if tensor is None:
        return None
    return tensor.reshape(-1, vocab) if vocab is not None else tensor.reshape(-1)


def _labels(batch_shape, vocab, generator, ignore_fraction=0.25):
    labels = torch.randint(0, vocab, batch_shape, generator=generator)
    ignored = torch.rand(batch_shape, generator=generator) < ignore_fraction
    return torch.where(ignored, torch.full_like(labels, -100), labels)


def check_one_teacher_against_gold(problem, labels, backend):
    """distillation_divergence(student, teacher) with teacher = the problem's partial logits."""
    device = device_for(backend)
    vocab = problem.student.shape[-1]
    temperature = problem.temperature
    kwargs = dict(beta=problem.beta, backend=backend, labels=labels.to(device),
                  temperature=temperature.to(device) if isinstance(temperature, torch.Tensor) else temperature,
                  mask=None if problem.mask is None else problem.mask.to(device),
                  weights=None if problem.weights is None else problem.weights.to(device))
    student = problem.student.to(device).requires_grad_(True)
    teacher = problem.partial.to(device)
    per_token, diagnostics = distillation_divergence(student, teacher, reduction="none", return_diagnostics=True,
                                                     **kwargs)
    distillation_divergence(student, teacher, reduction="sum", **kwargs).backward()

    flat_temperature = _flat(temperature) if isinstance(temperature, torch.Tensor) else temperature
    flat = dict(student=_flat(problem.student, vocab), partial=_flat(problem.partial, vocab),
                full=_flat(problem.partial, vocab), lam=0.0, clip=math.inf, beta=problem.beta,
                temperature=flat_temperature)
    expected, plain_float32 = gold(**flat), gold(**flat, dtype=torch.float32)
    n_rows = expected.loss.shape[0]
    active = _flat(labels) != -100
    if problem.mask is not None:
        active &= _flat(problem.mask)
    weights = torch.ones(n_rows, dtype=torch.float64) if problem.weights is None else _flat(problem.weights).double()
    zero = torch.zeros_like(expected.loss)
    assert_loss_close(_flat(per_token), torch.where(active, expected.loss * weights, zero), "per-token loss")
    assert diagnostics.belief_shift is None and diagnostics.clipped_mass is None
    assert_loss_close(_flat(diagnostics.student_entropy), torch.where(active, expected.diagnostics[2], zero),
                      "student_entropy")
    assert_loss_close(_flat(diagnostics.target_entropy), torch.where(active, expected.diagnostics[3], zero),
                      "target_entropy")
    token_student, token_target = gold_token_logprobs(flat["student"], flat["partial"], None, _flat(labels),
                                                      lam=0.0, clip=math.inf, temperature=flat_temperature)
    assert_loss_close(_flat(diagnostics.student_token_logprob), torch.where(active, token_student, zero),
                      "student_token_logprob")
    assert_loss_close(_flat(diagnostics.target_token_logprob), torch.where(active, token_target, zero),
                      "target_token_logprob")

    finite_rows = torch.isfinite(expected.grad).all(-1) | ~active
    grad = _flat(student.grad, vocab).cpu()
    assert torch.all(grad[~active] == 0)
    expected_grad = torch.where(active.unsqueeze(-1), expected.grad * weights.unsqueeze(-1), 0.0)
    baseline = torch.where(active.unsqueeze(-1), plain_float32.grad * weights.float().unsqueeze(-1), 0.0)
    row_temperature = (_flat(temperature).double() if isinstance(temperature, torch.Tensor)
                       else torch.full((n_rows,), float(temperature), dtype=torch.float64))
    units = (weights / row_temperature)[finite_rows & active]
    unit = units.max().item() if units.numel() else 0.0
    assert_grad_close(grad[finite_rows], expected_grad[finite_rows], baseline[finite_rows].to(grad.dtype), unit)


@given(problem=problems(), seed=st.integers(0, 2**31 - 1))
def test_one_teacher_matches_float64_gold(backend, problem, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = _labels(problem.student.shape[:-1], problem.student.shape[-1], generator)
    check_one_teacher_against_gold(problem, labels, backend)


@given(problem=problems(), seed=st.integers(0, 2**31 - 1))
def test_anchored_token_logprobs_match_float64_gold(backend, problem, seed):
    device = device_for(backend)
    vocab = problem.student.shape[-1]
    labels = _labels(problem.student.shape[:-1], vocab, torch.Generator().manual_seed(seed))
    temperature = problem.temperature
    _, diagnostics = anchored_residual_kl(
        problem.student.to(device), problem.partial.to(device), problem.full.to(device), lam=problem.lam,
        clip=problem.clip, beta=problem.beta, labels=labels.to(device), backend=backend,
        temperature=temperature.to(device) if isinstance(temperature, torch.Tensor) else temperature,
        reduction="none", return_diagnostics=True)
    flat_temperature = _flat(temperature) if isinstance(temperature, torch.Tensor) else temperature
    token_student, token_target = gold_token_logprobs(
        _flat(problem.student, vocab), _flat(problem.partial, vocab), _flat(problem.full, vocab), _flat(labels),
        lam=problem.lam, clip=problem.clip, temperature=flat_temperature)
    active = _flat(labels) != -100
    assert_loss_close(_flat(diagnostics.student_token_logprob), torch.where(active, token_student, 0.0),
                      "student_token_logprob")
    assert_loss_close(_flat(diagnostics.target_token_logprob), torch.where(active, token_target, 0.0),
                      "target_token_logprob")


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
def test_one_teacher_equals_the_anchored_target_with_lam_zero(backend, beta):
    generator = torch.Generator().manual_seed(11)
    student, teacher, other = (torch.randn(3, 5, 97, generator=generator) * 3 for _ in range(3))
    device = device_for(backend)
    student, teacher, other = student.to(device), teacher.to(device), other.to(device)
    one = distillation_divergence(student, teacher, beta=beta, reduction="none", backend=backend)
    anchored = anchored_residual_kl(student, teacher, other, lam=0.0, beta=beta, reduction="none", backend=backend)
    torch.testing.assert_close(one, anchored, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry", ["one teacher", "anchored"])
def test_token_logprobs_are_read_before_an_inplace_gradient_overwrites_the_logits(backend, entry):
    generator = torch.Generator().manual_seed(12)
    student, teacher, full = (torch.randn(4, 301, generator=generator) * 3 for _ in range(3))
    labels = torch.tensor([3, -100, 300, 0])
    device = device_for(backend)
    teachers = (teacher.to(device),) if entry == "one teacher" else (teacher.to(device), full.to(device))
    loss_fn = distillation_divergence if entry == "one teacher" else anchored_residual_kl
    results = []
    for inplace in (False, True):
        logits = student.to(device).clone().requires_grad_(True) * 1
        _, diagnostics = loss_fn(logits, *teachers, labels=labels.to(device), return_diagnostics=True,
                                 inplace_grad=inplace, backend=backend)
        results.append((diagnostics.student_token_logprob, diagnostics.target_token_logprob))
    for separate, inplace in zip(*results):
        assert torch.equal(separate, inplace)


def test_labels_outside_the_vocabulary_are_refused_when_their_logprobs_are_asked():
    student, teacher = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    labels = torch.tensor([[0, 9, 10], [-100, 1, 2]])
    distillation_divergence(student, teacher, labels=labels)  # labels only select rows here
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        distillation_divergence(student, teacher, labels=labels, return_diagnostics=True)
    masked = torch.tensor([[True, True, False], [True, True, True]])
    distillation_divergence(student, teacher, labels=labels, mask=masked, return_diagnostics=True)


def test_one_teacher_bad_input_names_the_teacher():
    student = torch.randn(2, 5)
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        distillation_divergence(student, torch.randn(2, 5, requires_grad=True))
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        distillation_divergence(student, torch.randn(2, 6))
