"""docs/integration.md §8: the k1 and k3 estimators built from the labels' log-probabilities average,
under the student, to the per-token reverse KL that the loss computes exactly. Every backend."""

from __future__ import annotations

import math

import pytest
import torch

from aropd_kernels import distillation_divergence
from conftest import assert_loss_close, device_for, gold


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_k1_and_k3_average_to_the_reverse_kl_under_the_student(backend, temperature):
    generator = torch.Generator().manual_seed(21)
    n_tokens, vocab = 4, 37
    student, teacher = (torch.randn(n_tokens, vocab, generator=generator) * 2 for _ in range(2))
    device = device_for(backend)
    # every token's row once per vocabulary entry y, labelled y: log p(y) and log q(y) for all y at once
    every_label = torch.arange(vocab).repeat(n_tokens)
    _, diagnostics = distillation_divergence(
        student.repeat_interleave(vocab, 0).to(device), teacher.repeat_interleave(vocab, 0).to(device),
        labels=every_label.to(device), temperature=temperature, reduction="none", return_diagnostics=True,
        backend=backend)
    log_p = diagnostics.student_token_logprob.double().cpu().view(n_tokens, vocab)
    log_q = diagnostics.target_token_logprob.double().cpu().view(n_tokens, vocab)
    log_ratio = log_p - log_q
    k1 = log_ratio
    k3 = torch.expm1(-log_ratio) + log_ratio
    reverse_kl = gold(student, teacher, teacher, lam=0.0, clip=math.inf, beta=1.0, temperature=temperature).loss
    assert_loss_close((log_p.exp() * k1).sum(-1), reverse_kl, "E_p[k1]")
    assert_loss_close((log_p.exp() * k3).sum(-1), reverse_kl, "E_p[k3]")
