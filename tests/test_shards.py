"""The shard stages of every backend that has them, with the vocabulary split in-process.

Each shard runs :func:`aropd_kernels.shards.run_stages` in its own thread; their ``gather`` meets at a
barrier and stacks every shard's tensor, as an all-gather across a vocabulary-parallel group does.
The losses and diagnostics must equal the whole-vocabulary ones and the shards' gradients must
concatenate to the whole gradient, against the float64 gold.
"""

from __future__ import annotations

import importlib
import math
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aropd_kernels import reference, shards
from conftest import assert_grad_close, assert_loss_close, backends_under_test, gold, gold_token_logprobs
from strategies import Problem, problems
from test_properties import confident_student_problem


def stage_backends() -> list[str]:
    """The backends here whose module provides the shard stages."""
    names = []
    for name in backends_under_test():
        module = importlib.import_module(f"aropd_kernels.{name}")
        if hasattr(module, "shard_target_sums"):
            names.append(name)
    return names


class InProcessGroup:
    """An all-gather among ``size`` threads: each call returns every shard's tensor, stacked in rank order."""

    def __init__(self, size: int):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=60)

    def gather_for(self, rank: int):
        def gather(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor
            self.barrier.wait()
            stacked = torch.stack(list(self.slots))
            self.barrier.wait()  # everyone has read the slots before the next stage overwrites them
            return stacked

        return gather


class OneStageAtATime:
    """A backend's stage functions, called by one thread at a time (the gather between them is not
    locked). Triton's interpreter patches triton.language while a kernel runs and restores it after, so
    two interpreted launches in different threads break each other; a process per shard (a real group)
    has no such problem."""

    lock = threading.Lock()

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        stage = getattr(self.module, name)

        def locked(*args, **kwargs):
            with self.lock:
                return stage(*args, **kwargs)

        return locked


def run_sharded(backend, boundaries, student, partial, full, row_temperature, active, grad_scale, labels, *, lam,
                clip, beta):
    """run_stages on each vocabulary shard [boundaries[r], boundaries[r + 1]) in its own thread."""
    stages = OneStageAtATime(importlib.import_module(f"aropd_kernels.{backend}"))
    size = len(boundaries) - 1
    group = InProcessGroup(size)
    results, grads, errors = [None] * size, [None] * size, []

    def shard(rank):
        try:
            columns = slice(boundaries[rank], boundaries[rank + 1])
            views = [None if x is None else x[..., columns] for x in (student, partial, full)]
            grad = torch.empty(views[0].shape, dtype=student.dtype) if grad_scale is not None else None
            local_labels = None if labels is None else labels - boundaries[rank]
            results[rank] = shards.run_stages(
                stages, *views, row_temperature, active, grad_scale, grad, lam=lam, clip=clip, beta=beta,
                with_diagnostics=True, labels=local_labels, gather=group.gather_for(rank))
            grads[rank] = grad
        except BaseException as error:  # noqa: BLE001 -- reported below, and the barrier released
            errors.append(error)
            group.barrier.abort()

    threads = [threading.Thread(target=shard, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    grad = torch.cat(grads, dim=-1) if grad_scale is not None else None
    return results, grad


def _as_rows_view(x):
    return None if x is None else x.reshape(1, -1, x.shape[-1])


def check_sharded_against_gold(backend, problem, boundaries, one_teacher):
    """Every shard's losses and diagnostics equal the whole vocabulary's float64 gold, and the shards'
    gradients concatenate to the whole gradient (SPEC §4's rule)."""
    vocab = problem.student.shape[-1]
    student, partial = _as_rows_view(problem.student.contiguous()), _as_rows_view(problem.partial.contiguous())
    full = None if one_teacher else _as_rows_view(problem.full.contiguous())
    n_rows = student.shape[1]
    temperature = problem.temperature
    row_temperature = (temperature.reshape(-1).float() if isinstance(temperature, torch.Tensor)
                       else torch.full((n_rows,), float(temperature)))
    active = torch.ones(n_rows, dtype=torch.bool) if problem.mask is None else problem.mask.reshape(-1).clone()
    grad_scale = torch.rand(n_rows, generator=torch.Generator().manual_seed(n_rows)) + 0.5
    labels = torch.randint(0, vocab, (n_rows,), generator=torch.Generator().manual_seed(vocab))
    lam, clip = (0.0, math.inf) if one_teacher else (problem.lam, problem.clip)
    results, grad = run_sharded(backend, boundaries, student, partial, full, row_temperature, active, grad_scale,
                                labels, lam=lam, clip=clip, beta=problem.beta)

    flat = dict(student=student[0], partial=partial[0], full=partial[0] if one_teacher else full[0], lam=lam,
                clip=clip, beta=problem.beta, temperature=row_temperature)
    expected = gold(**flat)
    zero = torch.zeros(n_rows, dtype=torch.float64)
    token_student, token_target = gold_token_logprobs(flat["student"], flat["partial"], None if one_teacher
                                                      else flat["full"], labels, lam=lam, clip=clip,
                                                      temperature=row_temperature)
    wanted = [expected.diagnostics[k] for k in range(4)] + [token_student, token_target]
    if one_teacher:
        wanted[0] = wanted[1] = zero
    for rank, result in enumerate(results):
        assert_loss_close(result.row_loss, torch.where(active, expected.loss, zero), f"shard {rank} loss")
        for k, name in enumerate(("belief_shift", "clipped_mass", "student_entropy", "target_entropy",
                                  "student_token_logprob", "target_token_logprob")):
            assert_loss_close(result.diagnostics[k], torch.where(active, wanted[k], zero), f"shard {rank} {name}")

    finite_rows = torch.isfinite(expected.grad).all(-1) | ~active
    grad = grad.reshape(n_rows, vocab)
    assert torch.all(grad[~active] == 0)
    scale = grad_scale.double().unsqueeze(-1)
    expected_grad = torch.where(active.unsqueeze(-1), expected.grad * scale, 0.0)
    baseline = torch.where(active.unsqueeze(-1), gold(**flat, dtype=torch.float32).grad * scale.float(), 0.0)
    units = (grad_scale.double() / row_temperature.double())[finite_rows & active]
    unit = units.max().item() if units.numel() else 0.0
    assert_grad_close(grad[finite_rows], expected_grad[finite_rows], baseline[finite_rows].to(grad.dtype), unit)


@pytest.mark.parametrize("backend", stage_backends())
@given(problem=problems(dtypes=(torch.float32, torch.bfloat16), vocab_sizes=(2, 3, 7, 64, 65, 257, 1001)),
       n_shards=st.integers(1, 3), one_teacher=st.booleans(), data=st.data())
def test_shards_reproduce_the_whole_vocabulary(backend, problem, n_shards, one_teacher, data):
    vocab = problem.student.shape[-1]
    n_shards = min(n_shards, vocab)
    cuts = sorted(data.draw(st.lists(st.integers(1, vocab - 1), min_size=n_shards - 1, max_size=n_shards - 1,
                                     unique=True))) if n_shards > 1 else []
    check_sharded_against_gold(backend, problem, [0, *cuts, vocab], one_teacher)


def _far_below_zero_cases():
    """(backend, beta) pairs. Known defect, kept visible as a strict xfail: the reference's and the native
    kernel's shard gradient stage for forward KL miss the gradient rule here (max-abs error 1.7e-4
    against plain float32 torch's 2.6e-5): q = exp(z - lse_z) is formed from z held in float32, whose ulp
    near -1157 is 1.2e-4 (z's max error here 1.5e-4; plain float32 torch's, 7.9e-5, happens to land its
    gradient within the rule on this seed). Triton's stage also forms z in float32 (base 2) and passes
    this seed. The fix is a compensated z: z - lse_z formed without a float32 value of z's size. Their
    fused single-process paths pass."""
    for backend in stage_backends():
        for beta in (1.0, 0.0, 0.5):
            if beta == 0.0 and backend in ("reference", "native"):
                yield pytest.param(backend, beta, marks=pytest.mark.xfail(
                    strict=True, reason="forward-KL shard gradient rounds z at its ulp (see docstring)"))
            else:
                yield backend, beta


@pytest.mark.parametrize(("backend", "beta"), list(_far_below_zero_cases()))
def test_shards_keep_precision_where_the_target_is_far_below_zero(backend, beta):
    """The anchor forbids the full teacher's top token, so at T = 0.05 the target's likely tokens have
    log-probabilities near -1200 and lse_z is as far from 0: lq = z - lse_z must not be rounded at
    the ulp of 1200 (the stages get lse_z from the combined sums, not the row's max of z), and each
    shard's weighted sums must stay centered on its own max of z, re-centered on the row's when
    combined, or the entropy and forward KL cancel at z's ulp."""
    generator = torch.Generator().manual_seed(64)  # the seed of test_properties' case at this V
    student, partial, full = (torch.randn(2, 64, generator=generator, dtype=torch.float64) for _ in range(3))
    full -= 60.0
    full[:, 0], partial[:, 0] = 0.0, -math.inf
    problem = Problem(student.float(), partial.float(), full.float(), lam=1.0, clip=math.inf, beta=beta,
                      temperature=0.05, mask=None, weights=None)
    check_sharded_against_gold(backend, problem, [0, 20, 64], one_teacher=False)


@pytest.mark.parametrize("backend", stage_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shards_keep_the_gradient_rule_for_a_confident_student(backend, dtype):
    """Reverse KL of 15 to 115 nats whose gradient cancels at the confident token: the shards' mean gap,
    combined in float64, must be what their rounded terms say."""
    for seed in range(3):
        check_sharded_against_gold(backend, confident_student_problem(64, dtype, seed), [0, 31, 64],
                                   one_teacher=False)


def test_one_shard_is_the_backend_itself():
    """Every stage backend's single-process result equals its own stages on one shard (no split)."""
    generator = torch.Generator().manual_seed(3)
    student, partial, full = (torch.randn(1, 4, 129, generator=generator) * 3 for _ in range(3))
    settings = dict(lam=0.7, clip=2.0, beta=0.3, with_diagnostics=True)
    rows = (torch.ones(4), torch.ones(4, dtype=torch.bool))
    for backend in stage_backends():
        stages = importlib.import_module(f"aropd_kernels.{backend}")
        whole = stages.compute_rows(student, partial, full, *rows, None, None, **settings)
        staged = shards.run_stages(stages, student, partial, full, *rows, None, None, **settings)
        torch.testing.assert_close(staged.row_loss, whole.row_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(staged.diagnostics, whole.diagnostics, rtol=1e-5, atol=1e-6)


def test_float64_normalizers_combine_in_float64():
    """Shards' float64 log-sums combine to the whole row's float64 log-sum-exp, also at a temperature whose
    float32 reciprocal is inexact (the per-row temperatures are float32)."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 4, 1001, generator=generator, dtype=torch.float64) * 5
    row_temperature = torch.full((4,), 0.7)
    active = torch.ones(4, dtype=torch.bool)
    whole = reference.shard_normalizers(logits, logits, None, row_temperature, active)
    split = torch.stack([reference.shard_normalizers(part, part, None, row_temperature, active)
                         for part in logits.split([300, 400, 301], dim=-1)])
    combined = shards.combine_normalizers(split, row_temperature)
    torch.testing.assert_close(combined, whole, rtol=1e-14, atol=1e-14)
