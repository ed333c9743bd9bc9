"""Vocabulary-parallel calls over real process groups: gloo on 127.0.0.1, one spawned process per rank.

A spawned process spends seconds importing torch, so one launch starts three ranks and runs every check
on all three, then on ranks 0 and 1; each (check, world size) is then reported as a test of its own.
Every rank holds the whole problem (seeded, identical everywhere), calls the package on its vocabulary
shard (uneven: V = 1001 over 2 or 3 ranks), and compares with the float64 gold of the whole vocabulary.
The torchrun demo is the second launch.

Nothing can hang: each check runs on process groups of its own whose collectives time out (30 s; 10 s
in the bad-input checks, which must finish long before), so a rank that fails mid-check leaves the
others waiting at most that long and the next check starts in step; a launch is killed after
LAUNCH_TIMEOUT_S; after each launch no rank is alive and nothing listens on its port.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
import types
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from aropd_kernels import (
    DoubleBackwardError, anchored_residual_kl, distillation_divergence, distributed, fused_linear_anchored_residual_kl,
    fused_linear_distillation_divergence,
)
from conftest import assert_grad_close, assert_loss_close, gold, gold_token_logprobs
from strategies import LinearProblem
from test_fused_linear import Expected, floor_units
from test_shards import stage_backends

VOCAB = 1001
SHARD_BOUNDS = {2: (0, 433, VOCAB), 3: (0, 300, 651, VOCAB)}  # contiguous, uneven, in rank order
LAUNCH_TIMEOUT_S = 240
STEP_TIMEOUT = timedelta(seconds=90)  # the launch's own group, which keeps the ranks in step between checks
COLLECTIVE_TIMEOUT = timedelta(seconds=30)
BAD_INPUT_TIMEOUT = timedelta(seconds=10)
EXAMPLES = Path(__file__).resolve().parents[1] / "python"


class Rank(NamedTuple):
    rank: int
    world_size: int
    group: dist.ProcessGroup  # every rank, for this check only
    quick_group: dist.ProcessGroup  # the same ranks, with a short timeout: a hang fails fast
    backends: tuple[str, ...]  # every backend here with the shard stages

    @property
    def columns(self) -> slice:
        bounds = SHARD_BOUNDS[self.world_size]
        return slice(bounds[self.rank], bounds[self.rank + 1])

    def shard(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[..., self.columns]


CHECKS = {}


def check(function):
    CHECKS[function.__name__] = function
    return function


# --- problems and the gold -------------------------------------------------------------------------------


class WholeProblem(NamedTuple):
    """The whole vocabulary, float64, the same on every rank."""

    student: torch.Tensor
    partial: torch.Tensor
    full: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    temperature: torch.Tensor


def whole_problem(seed: int, world_size: int, batch_shape=(2, 3)) -> WholeProblem:
    """Random logits with -inf padding inside the last shard only, a row whose first shard is all -inf,
    a token only the partial teacher forbids, labels on shard boundaries and ignored tokens."""
    generator = torch.Generator().manual_seed(seed)
    shape = (*batch_shape, VOCAB)
    bounds = SHARD_BOUNDS[world_size]

    def logits():
        return torch.randn(shape, generator=generator, dtype=torch.float64) * 3

    student, partial = logits(), logits()
    full = partial + 2 * logits()
    for tensor in (student, partial, full):
        tensor[..., bounds[-2] + 3: bounds[-2] + 40] = -math.inf  # vocabulary padding
        tensor[0, 0, : bounds[1]] = -math.inf  # one row: the first shard sees only -inf
    partial[1, 2, bounds[1] + 1] = -math.inf  # infinite reverse KL and belief shift on this row
    labels = torch.randint(0, VOCAB, batch_shape, generator=generator)
    labels[0, 1] = -100
    labels[1, 0] = bounds[1]  # the first token of the second shard
    labels[1, 1] = VOCAB - 1
    mask = torch.rand(batch_shape, generator=generator) > 0.2
    weights = torch.rand(batch_shape, generator=generator) * 2
    temperature = 0.5 + torch.rand(batch_shape, generator=generator)
    return WholeProblem(student, partial, full, labels, mask, weights, temperature)


def flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() > 2 else tensor.reshape(-1)


def check_against_gold(ctx: Rank, problem: WholeProblem, *, one_teacher: bool, beta: float, dtype: torch.dtype,
                       backend: str, lam: float = 0.8, clip: float = 2.0) -> None:
    """Per-token losses, diagnostics and this rank's gradient columns against the whole vocabulary's
    float64 gold; the losses and diagnostics must be the same bits on every rank."""
    if one_teacher:
        lam, clip = 0.0, math.inf
    student, partial, full = (x.to(dtype) for x in (problem.student, problem.partial, problem.full))
    teachers = (partial,) if one_teacher else (partial, full)
    loss_fn = distillation_divergence if one_teacher else anchored_residual_kl
    settings = {} if one_teacher else dict(lam=lam, clip=clip)
    keywords = dict(beta=beta, temperature=problem.temperature, labels=problem.labels, mask=problem.mask,
                    weights=problem.weights, backend=backend, process_group=ctx.group, **settings)
    shard = ctx.shard(student).clone().requires_grad_(True)
    per_token, diagnostics = loss_fn(shard, *(ctx.shard(t) for t in teachers), reduction="none",
                                     return_diagnostics=True, **keywords)
    loss_fn(shard, *(ctx.shard(t) for t in teachers), reduction="sum", **keywords).backward()

    temperature = flat(problem.temperature)
    whole = dict(student=flat(student), partial=flat(partial), full=flat(partial if one_teacher else full),
                 lam=lam, clip=clip, beta=beta, temperature=temperature)
    expected, plain_float32 = gold(**whole), gold(**whole, dtype=torch.float32)
    active = (flat(problem.labels) != -100) & flat(problem.mask)
    weights = flat(problem.weights).double()
    zero = torch.zeros_like(expected.loss)
    assert_loss_close(flat(per_token), torch.where(active, expected.loss * weights, zero), "per-token loss")
    token_logprobs = gold_token_logprobs(whole["student"], whole["partial"], None if one_teacher else whole["full"],
                                         flat(problem.labels), lam=lam, clip=clip, temperature=temperature)
    wanted = dict(student_entropy=expected.diagnostics[2], target_entropy=expected.diagnostics[3],
                  student_token_logprob=token_logprobs[0], target_token_logprob=token_logprobs[1])
    if one_teacher:
        assert diagnostics.belief_shift is None and diagnostics.clipped_mass is None
    else:
        wanted.update(belief_shift=expected.diagnostics[0], clipped_mass=expected.diagnostics[1])
    for name, value in wanted.items():
        assert_loss_close(flat(getattr(diagnostics, name)), torch.where(active, value, zero), name)
        assert_same_on_every_rank(ctx, getattr(diagnostics, name))
    assert_same_on_every_rank(ctx, per_token)

    columns = ctx.columns
    grad = flat(shard.grad)
    finite_rows = torch.isfinite(expected.grad).all(-1) | ~active
    assert torch.all(grad[~active] == 0)
    scale = torch.where(active, weights, 0.0).unsqueeze(-1)
    expected_grad = (expected.grad * scale)[:, columns]
    baseline = (plain_float32.grad * scale.float())[:, columns].to(grad.dtype)
    unit = (weights / temperature.double())[finite_rows & active].max().item()
    assert_grad_close(grad[finite_rows], expected_grad[finite_rows], baseline[finite_rows], unit)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, message: str = "") -> None:
    """Equal entries (NaN where NaN: a row whose divergence is infinite has NaN gradient entries)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=message or None)


def assert_same_on_every_rank(ctx: Rank, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().contiguous()
    everyone = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, tensor, group=ctx.group)
    for rank, other in enumerate(everyone):
        assert_same_bits(other, tensor, f"rank {rank} got other bits than rank {ctx.rank}")


# --- the checks ------------------------------------------------------------------------------------------


@check
def every_divergence_teacher_count_and_backend_matches_the_gold(ctx: Rank):
    dtypes = (torch.float32, torch.bfloat16)
    for backend in ctx.backends:
        for index, (beta, one_teacher) in enumerate((b, o) for b in (1.0, 0.0, 0.35) for o in (False, True)):
            check_against_gold(ctx, whole_problem(index, ctx.world_size), one_teacher=one_teacher, beta=beta,
                               dtype=dtypes[index % 2], backend=backend)


@check
def float64_shards_lose_no_precision(ctx: Rank):
    problem = whole_problem(7, ctx.world_size)
    for beta in (1.0, 0.0, 0.35):
        shard = ctx.shard(problem.student).clone().requires_grad_(True)
        per_token = anchored_residual_kl(shard, ctx.shard(problem.partial), ctx.shard(problem.full), lam=0.8,
                                         clip=2.0, beta=beta, temperature=problem.temperature, reduction="none",
                                         process_group=ctx.group)
        per_token.sum().backward()
        expected = gold(flat(problem.student), flat(problem.partial), flat(problem.full), lam=0.8, clip=2.0,
                        beta=beta, temperature=flat(problem.temperature).float())  # per-row temperatures are float32
        finite = torch.isfinite(expected.loss)
        assert torch.equal(torch.isinf(flat(per_token)), ~finite)
        torch.testing.assert_close(flat(per_token)[finite], expected.loss[finite], rtol=1e-10, atol=1e-12)
        finite_rows = torch.isfinite(expected.grad).all(-1)
        torch.testing.assert_close(flat(shard.grad)[finite_rows], expected.grad[finite_rows][:, ctx.columns],
                                   rtol=1e-9, atol=1e-12)


@check
def every_reduction_equals_the_single_process_call(ctx: Rank):
    problem = whole_problem(3, ctx.world_size)
    student, partial, full = (x.float() for x in (problem.student, problem.partial, problem.full))
    cases = [dict(reduction=r) for r in ("none", "sum", "batchmean", "seq_mean")]
    cases += [dict(reduction="batchmean", num_items_in_batch=9), dict(reduction="seq_mean", num_items_in_batch=4)]
    for one_teacher, beta in ((False, 1.0), (True, 0.0), (False, 0.5)):
        loss_fn = distillation_divergence if one_teacher else anchored_residual_kl
        teachers = (partial,) if one_teacher else (partial, full)
        for case in cases:
            keywords = dict(beta=beta, labels=problem.labels, weights=problem.weights, backend="reference", **case)
            whole = student.clone().requires_grad_(True)
            expected = loss_fn(whole, *teachers, **keywords)
            expected.sum().backward()
            shard = ctx.shard(student).clone().requires_grad_(True)
            loss = loss_fn(shard, *(ctx.shard(t) for t in teachers), process_group=ctx.group, **keywords)
            loss.sum().backward()
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6, equal_nan=True, msg=str(case))
            torch.testing.assert_close(shard.grad, whole.grad[..., ctx.columns], rtol=1e-4, atol=1e-7,
                                       equal_nan=True, msg=str(case))


@contextlib.contextmanager
def counted_collectives():
    """Every torch.distributed collective called inside, as (name, bytes this rank sends)."""
    names = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_gather_object", "all_reduce",
             "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
             "all_to_all", "all_to_all_single", "gather", "scatter", "barrier", "send", "recv", "isend", "irecv")
    calls, originals = [], {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def counted(name, original):
        @functools.wraps(original)
        def call(*args, **kwargs):
            sent = args[1] if name == "all_gather_single" else next(
                (a for a in args if isinstance(a, torch.Tensor)), None)
            calls.append((name, 0 if sent is None else sent.numel() * sent.element_size()))
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(dist, name, counted(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


@check
def a_call_is_at_most_four_all_gathers_of_o_n_numbers(ctx: Rank):
    record = 8 * len(distributed.RECORD_FIELDS) + distributed.MESSAGE_BYTES
    for n_rows in (6, 12):
        problem = whole_problem(5, ctx.world_size, batch_shape=(2, n_rows // 2))
        for one_teacher, beta, dtype in ((False, 1.0, torch.float32), (False, 0.0, torch.bfloat16),
                                         (False, 0.5, torch.float32), (True, 0.5, torch.float32),
                                         (False, 1.0, torch.float64)):
            student, partial, full = (ctx.shard(x.to(dtype)) for x in (problem.student, problem.partial, problem.full))
            student = student.clone().requires_grad_(True)
            loss_fn = distillation_divergence if one_teacher else anchored_residual_kl
            teachers = (partial,) if one_teacher else (partial, full)
            with counted_collectives() as calls:
                loss, _ = loss_fn(student, *teachers, beta=beta, labels=problem.labels, return_diagnostics=True,
                                  process_group=ctx.group)
            normalizer_bytes = (2 if one_teacher else 3) * 2 * (8 if dtype == torch.float64 else 4)
            expected = [("all_gather_single", record), ("all_gather_single", normalizer_bytes * n_rows),
                        ("all_gather_single", 8 * 13 * n_rows)]
            if 0 < beta < 1:
                expected.append(("all_gather_single", 8 * 2 * n_rows))
            assert calls == expected, (one_teacher, beta, dtype, calls)
            with counted_collectives() as calls:
                loss.backward()
            assert calls == [], "backward communicates"


@check
def gradients_follow_the_autograd_rules(ctx: Rank):
    problem = whole_problem(11, ctx.world_size)
    student, partial, full = (ctx.shard(x.to(torch.bfloat16)) for x in (problem.student, problem.partial,
                                                                         problem.full))
    keywords = dict(labels=problem.labels, process_group=ctx.group)
    leaf = student.clone().requires_grad_(True)
    loss = anchored_residual_kl(leaf, partial, full, **keywords)
    loss.backward(retain_graph=True)
    once = leaf.grad.clone()
    loss.backward()
    assert_same_bits(leaf.grad, 2 * once, "retain_graph: the stored gradient was modified")

    leaf.grad = None
    (anchored_residual_kl(leaf, partial, full, **keywords) / 3).backward()
    third = torch.tensor(1.0).div(3)  # the incoming gradient, float32
    expected = (once.float() * third).to(torch.bfloat16)  # applied in float32, rounded once
    assert_same_bits(leaf.grad, expected)

    leaf.grad = None
    per_token = anchored_residual_kl(leaf, partial, full, reduction="none", **keywords)
    incoming = torch.rand(per_token.shape, generator=torch.Generator().manual_seed(0))
    per_token.backward(incoming)
    leaf_sum = leaf.detach().clone().requires_grad_(True)
    (anchored_residual_kl(leaf_sum, partial, full, reduction="none", weights=incoming, **keywords).sum()).backward()
    torch.testing.assert_close(leaf.grad, leaf_sum.grad, rtol=1e-2, atol=1e-6, equal_nan=True)

    with torch.no_grad():
        assert_same_bits(anchored_residual_kl(leaf, partial, full, **keywords), loss)
    double = anchored_residual_kl(leaf, partial, full, **keywords)
    with pytest.raises(DoubleBackwardError):
        torch.autograd.grad(double, leaf, create_graph=True)


@check
def inplace_grad_overwrites_the_shard_with_its_gradient(ctx: Rank):
    problem = whole_problem(13, ctx.world_size)
    student, partial, full = (ctx.shard(x.float()) for x in (problem.student, problem.partial, problem.full))
    for one_teacher in (False, True):
        loss_fn = distillation_divergence if one_teacher else anchored_residual_kl
        teachers = (partial,) if one_teacher else (partial, full)
        keywords = dict(beta=0.35, labels=problem.labels, process_group=ctx.group, return_diagnostics=True)
        separate = student.clone().requires_grad_(True)
        expected, expected_diagnostics = loss_fn(separate, *teachers, **keywords)
        expected.backward()
        leaf = student.clone().requires_grad_(True)
        logits = leaf * 1  # a model's output: a non-leaf
        loss, diagnostics = loss_fn(logits, *teachers, inplace_grad=True, **keywords)
        loss.backward()
        assert_same_bits(loss, expected)
        assert_same_bits(diagnostics.target_token_logprob, expected_diagnostics.target_token_logprob)
        assert_same_bits(leaf.grad, separate.grad)
        assert_same_bits(logits.detach(), separate.grad)
        with pytest.raises(ValueError, match="leaf"):
            loss_fn(separate, *teachers, inplace_grad=True, **keywords)


@check
def the_call_compiles_with_a_graph_break(ctx: Rank):
    problem = whole_problem(17, ctx.world_size)
    student, partial, full = (ctx.shard(x.float()) for x in (problem.student, problem.partial, problem.full))

    def step(logits):
        return 2 * anchored_residual_kl(logits.float(), partial, full, labels=problem.labels,
                                        process_group=ctx.group)

    results = []
    for run in (step, torch.compile(step, backend="eager")):
        leaf = student.clone().requires_grad_(True)
        loss = run(leaf)
        loss.backward()
        results.append((loss, leaf.grad))
    assert_same_bits(results[1][0], results[0][0])
    assert_same_bits(results[1][1], results[0][1])


@check
def empty_and_fully_skipped_batches(ctx: Rank):
    problem = whole_problem(19, ctx.world_size)
    student, partial, full = (ctx.shard(x.float()) for x in (problem.student, problem.partial, problem.full))
    empty = student[:0].clone().requires_grad_(True)
    loss = anchored_residual_kl(empty, partial[:0], full[:0], process_group=ctx.group)
    loss.backward()
    assert loss.item() == 0 and empty.grad.shape == empty.shape
    leaf = student.clone().requires_grad_(True)
    loss = anchored_residual_kl(leaf, partial, full, mask=torch.zeros(student.shape[:-1], dtype=torch.bool),
                                process_group=ctx.group)
    loss.backward()
    assert loss.item() == 0 and torch.all(leaf.grad == 0)


def refused_on_every_rank(ctx: Rank, error: type, pattern: str, call) -> None:
    with pytest.raises(error, match=pattern):
        call()


@check
def bad_input_on_any_rank_is_refused_on_every_rank(ctx: Rank):
    problem = whole_problem(23, ctx.world_size)
    student, partial, full = (ctx.shard(x.float()) for x in (problem.student, problem.partial, problem.full))
    last = ctx.world_size - 1
    group = ctx.quick_group

    def call(s=student, p=partial, f=full, **keywords):
        return functools.partial(anchored_residual_kl, s, p, f, process_group=group, **keywords)

    n_rows = 4 if ctx.rank == last else 6
    refused_on_every_rank(ctx, ValueError, r"disagree on rows \(rank 0: 6, .*: 4\)",
                          call(student.flatten(0, 1)[:n_rows], partial.flatten(0, 1)[:n_rows],
                               full.flatten(0, 1)[:n_rows]))
    narrower = partial[..., :-1] if ctx.rank == last else partial
    refused_on_every_rank(ctx, ValueError, f"rank {last} .* refused its inputs: ValueError: partial_teacher_logits "
                                           "holds .* vocabulary entries", call(p=narrower))
    integer = student.long() if ctx.rank == last else student
    refused_on_every_rank(ctx, TypeError, f"rank {last} .* TypeError: student_logits has dtype torch.int64",
                          call(s=integer))
    labels = problem.labels.clone()
    if ctx.rank == last:
        labels[1, 2] = (labels[1, 2] + 1) % VOCAB
    refused_on_every_rank(ctx, ValueError, "disagree on labels", call(labels=labels))
    mask = problem.mask.clone()
    if ctx.rank == 0:
        mask[0, 2] = ~mask[0, 2]
    refused_on_every_rank(ctx, ValueError, "disagree on active", call(mask=mask))
    refused_on_every_rank(ctx, ValueError, "disagree on beta", call(beta=1.0 if ctx.rank == 0 else 0.5))
    dtype = torch.bfloat16 if ctx.rank == 0 else torch.float32
    refused_on_every_rank(ctx, ValueError, "disagree on student_dtype", call(s=student.to(dtype)))
    if ctx.rank == 0:
        one_teacher = functools.partial(distillation_divergence, student, partial, process_group=group)
    else:
        one_teacher = call()
    refused_on_every_rank(ctx, ValueError, "disagree on teachers", one_teacher)
    outside = problem.labels.clone()
    outside[0, 0] = VOCAB
    refused_on_every_rank(ctx, ValueError, r"labels must lie in \[0, 1001\)",
                          call(labels=outside, return_diagnostics=True))
    refused_on_every_rank(ctx, TypeError, "process_group must be a torch.distributed.ProcessGroup",
                          functools.partial(anchored_residual_kl, student, partial, full, process_group="tp"))
    # the group is still in step after every refusal; a label anywhere in the whole vocabulary is fine
    last_token = problem.labels.clone()
    last_token[0, 0] = VOCAB - 1
    loss = call(labels=last_token, return_diagnostics=True)()[0]
    expected = anchored_residual_kl(problem.student.float(), problem.partial.float(), problem.full.float(),
                                    labels=last_token, backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@check
def dtensor_shards_run_the_same_path(ctx: Rank):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = DeviceMesh.from_group(ctx.group, "cpu")
    problem = whole_problem(29, ctx.world_size)
    student, partial, full = (x.float() for x in (problem.student, problem.partial, problem.full))
    labels = distribute_tensor(problem.labels, mesh, [Replicate()])
    for beta in (1.0, 0.35):
        expected_leaf = student.clone().requires_grad_(True)
        expected = anchored_residual_kl(expected_leaf, partial, full, beta=beta, labels=problem.labels,
                                        backend="reference")
        expected.backward()
        sharded = [distribute_tensor(x, mesh, [Shard(-1)]) for x in (student, partial, full)]
        leaf = sharded[0].requires_grad_(True)
        loss = anchored_residual_kl(leaf, *sharded[1:], beta=beta, labels=labels)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        assert isinstance(leaf.grad, DTensor) and leaf.grad.placements == leaf.placements
        local = leaf.grad.to_local()
        chunk = -(-VOCAB // ctx.world_size)
        torch.testing.assert_close(local, expected_leaf.grad[..., ctx.rank * chunk: (ctx.rank + 1) * chunk],
                                   rtol=1e-4, atol=1e-7, equal_nan=True)
        # inplace_grad on a DTensor a model produced
        logits = sharded[0].detach().requires_grad_(True)
        output = logits * 1
        anchored_residual_kl(output, *sharded[1:], beta=beta, labels=labels, inplace_grad=True).backward()
        assert_same_bits(logits.grad.to_local(), local)
        assert_same_bits(output.to_local().detach(), local)

    refused_on_every_rank(ctx, ValueError, "leaf",
                          lambda: anchored_residual_kl(sharded[0], *sharded[1:], inplace_grad=True))
    replicated = distribute_tensor(student, mesh, [Replicate()])
    refused_on_every_rank(ctx, ValueError, r"placed Replicate\(\); every rank holds the whole vocabulary",
                          lambda: anchored_residual_kl(replicated, *sharded[1:]))
    by_rows = distribute_tensor(student, mesh, [Shard(0)])
    refused_on_every_rank(ctx, ValueError, r"placed Shard\(dim=0\); the vocabulary is the last dimension",
                          lambda: anchored_residual_kl(by_rows, *sharded[1:]))
    partial_sums = DTensor.from_local(student.clone(), mesh, [Partial()])
    refused_on_every_rank(ctx, ValueError, "partial sums", lambda: anchored_residual_kl(partial_sums, *sharded[1:]))
    refused_on_every_rank(ctx, TypeError, "teacher_logits is a DTensor but student_logits is not",
                          lambda: distillation_divergence(ctx.shard(student), sharded[1]))
    sharded_labels = distribute_tensor(problem.labels, mesh, [Shard(0)])
    refused_on_every_rank(ctx, ValueError, "labels is a DTensor placed",
                          lambda: anchored_residual_kl(*sharded, labels=sharded_labels))
    bounds = SHARD_BOUNDS[ctx.world_size]
    if bounds[1] != chunk:  # these shards are not torch.chunk's
        not_chunks = [DTensor.from_local(ctx.shard(x), mesh, [Shard(-1)], run_check=False, shape=x.shape,
                                         stride=x.stride()) for x in (student, partial, full)]
        refused_on_every_rank(ctx, ValueError, "torch.chunk's split",
                              lambda: anchored_residual_kl(*not_chunks))
    wide = init_device_mesh("cpu", (1, ctx.world_size), mesh_dim_names=("dp", "tp"))
    on_two_dims = distribute_tensor(student, wide, [Replicate(), Shard(-1)])
    refused_on_every_rank(ctx, ValueError, "2-D device mesh",
                          lambda: anchored_residual_kl(on_two_dims, on_two_dims, on_two_dims))


# --- fused linear: lm_head weights split along the vocabulary -------------------------------------------


def whole_linear_problem(seed: int, world_size: int, dtype: torch.dtype, batch_shape=(2, 3)) -> LinearProblem:
    """Hidden states (replicated) and whole lm_head weights and biases, logits of size about 5, -inf padding
    in both biases inside the last shard, labels on a shard boundary and ignored tokens."""
    generator = torch.Generator().manual_seed(seed)
    student_size, teacher_size = 12, 9

    def normal(*shape, std=1.0):
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * std).to(dtype)

    bounds = SHARD_BOUNDS[world_size]
    biases = [normal(VOCAB), normal(VOCAB)]
    for bias in biases:
        bias[bounds[-2] + 3: bounds[-2] + 40] = -math.inf
    labels = torch.randint(0, VOCAB, batch_shape, generator=generator)
    labels[0, 1], labels[1, 0] = -100, bounds[1]
    partial = normal(*batch_shape, teacher_size)
    kwargs = dict(student_bias=biases[0], teacher_bias=biases[1], logit_scale=1.5, logit_softcap=20.0, chunk_size=4,
                  lam=0.8, clip=2.0, beta=1.0, temperature=0.5 + torch.rand(batch_shape, generator=generator),
                  labels=labels, mask=torch.rand(batch_shape, generator=generator) > 0.2,
                  weights=torch.rand(batch_shape, generator=generator) * 2, reduction="sum")
    return LinearProblem(normal(*batch_shape, student_size), normal(VOCAB, student_size, std=4 / math.sqrt(12)),
                         partial, partial + normal(*batch_shape, teacher_size, std=0.5),
                         normal(VOCAB, teacher_size, std=4 / math.sqrt(9)), kwargs, None)


def sharded_linear_call(ctx: Rank, problem: LinearProblem, *, one_teacher: bool, group=None, **overrides):
    """This rank's call on its vocabulary shard of the weights and biases: (per-token loss and diagnostics,
    loss with the problem's reduction, the student leaves)."""
    kwargs = {**problem.kwargs, **overrides}
    if one_teacher:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("lam", "clip")}
    leaves = [problem.student_hidden.clone().requires_grad_(True),
              problem.student_weight[ctx.columns].clone().requires_grad_(True),
              kwargs["student_bias"][ctx.columns].clone().requires_grad_(True)]
    kwargs.update(student_bias=leaves[2], teacher_bias=kwargs["teacher_bias"][ctx.columns],
                  process_group=group or ctx.group)
    views = (problem.partial_hidden,) if one_teacher else (problem.partial_hidden, problem.full_hidden)
    loss_fn = fused_linear_distillation_divergence if one_teacher else fused_linear_anchored_residual_kl
    teacher = (*views, problem.teacher_weight[ctx.columns])
    per_token = loss_fn(*leaves[:2], *teacher, **{**kwargs, "reduction": "none", "return_diagnostics": True})
    return per_token, loss_fn(*leaves[:2], *teacher, **kwargs), leaves


@check
def fused_linear_matches_the_gold_on_weight_shards(ctx: Rank):
    """Per-token losses and diagnostics (the same bits on every rank) and the gradients: this rank's rows
    of the weight and bias gradients, the hidden states' whole gradient (summed here, or by the caller)."""
    for index, (one_teacher, beta, dtype, reduce_hidden) in enumerate(
            ((False, 1.0, torch.float32, True), (True, 0.35, torch.bfloat16, False), (False, 0.0, torch.bfloat16, True))):
        problem = whole_linear_problem(index, ctx.world_size, dtype)
        problem = problem._replace(kwargs={**problem.kwargs, "beta": beta})
        (per_token, diagnostics), loss, leaves = sharded_linear_call(ctx, problem, one_teacher=one_teacher,
                                                                     reduce_hidden_grad=reduce_hidden)
        grads = torch.autograd.grad(loss, leaves)
        expected, plain = Expected(problem, torch.float64, one_teacher), Expected(problem, torch.float32, one_teacher)
        active = flat(problem.kwargs["labels"]).ne(-100) & flat(problem.kwargs["mask"])
        weights = flat(problem.kwargs["weights"]).double()
        assert_loss_close(flat(per_token), torch.where(active, expected.loss * weights, 0.0), "per-token loss")
        wanted = dict(zip(("belief_shift", "clipped_mass", "student_entropy", "target_entropy"), expected.diagnostics))
        wanted.update(zip(("student_token_logprob", "target_token_logprob"), expected.token_logprobs))
        for name, value in wanted.items():
            actual = getattr(diagnostics, name)
            if one_teacher and name in ("belief_shift", "clipped_mass"):
                assert actual is None
                continue
            assert_loss_close(flat(actual), torch.where(active, value, 0.0), name)
            assert_same_on_every_rank(ctx, actual)
        assert_same_on_every_rank(ctx, per_token)
        assert_same_on_every_rank(ctx, loss)
        hidden_grad = grads[0].float().clone()
        if not reduce_hidden:  # the caller's column-parallel layer sums the ranks' parts
            dist.all_reduce(hidden_grad, group=ctx.group)
        temperature = flat(problem.kwargs["temperature"]).double()
        units = floor_units(problem, expected.row_scale, temperature, active)
        for position, (actual, gold_grad, plain_grad) in enumerate(zip((hidden_grad, *grads[1:]), expected.grads,
                                                                      plain.grads)):
            if position > 0:  # weight and bias: this rank's vocabulary rows
                gold_grad, plain_grad = gold_grad[ctx.columns], plain_grad[ctx.columns]
            actual, gold_grad, plain_grad = (t.reshape(-1, t.shape[-1] if t.dim() > 1 else 1)
                                             for t in (actual, gold_grad, plain_grad))
            assert_grad_close(actual.double(), gold_grad, plain_grad.to(dtype), units[position])


@check
def fused_linear_collectives_per_chunk(ctx: Rank):
    """One agreement, then for each chunk with an active row the two all-gathers of its rows and the
    all-reduce of its hidden-state gradient; backward sends nothing (reduced losses), or reruns the chunks'
    collectives (per-token losses)."""
    problem = whole_linear_problem(3, ctx.world_size, torch.float32, batch_shape=(2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 4:] = mask[1, :3] = False  # chunks of 4 rows: [4 active], [none], [2 active]
    record = 8 * len(distributed.RECORD_FIELDS) + distributed.MESSAGE_BYTES
    chunk = [("all_gather_single", 3 * 2 * 4 * 4), ("all_gather_single", 8 * 13 * 4), ("all_reduce", 4 * 4 * 12)]
    last = [("all_gather_single", 3 * 2 * 4 * 2), ("all_gather_single", 8 * 13 * 2), ("all_reduce", 4 * 2 * 12)]
    kwargs = dict(mask=mask, labels=None, weights=None)
    with counted_collectives() as calls:
        _, loss, _ = sharded_linear_call(ctx, problem, one_teacher=False, **kwargs)
    per_token_forward = [(name, size) for name, size in chunk + last if name != "all_reduce"]
    assert calls == [("all_gather_single", record), *per_token_forward, ("all_gather_single", record), *chunk, *last]
    with counted_collectives() as calls:
        loss.backward()
    assert calls == []
    with counted_collectives() as calls:
        (per_token, _), _, _ = sharded_linear_call(ctx, problem, one_teacher=False, **kwargs)
        per_token.sum().backward()
    assert calls[-6:] == chunk + last  # backward reran the chunks, hidden-state sums included


@check
def fused_linear_bad_input_on_any_rank_is_refused_on_every_rank(ctx: Rank):
    problem = whole_linear_problem(5, ctx.world_size, torch.float32)
    last = ctx.world_size - 1
    group = ctx.quick_group
    refused_on_every_rank(ctx, ValueError, "disagree on chunk_rows", lambda: sharded_linear_call(
        ctx, problem, one_teacher=False, group=group, chunk_size=4 if ctx.rank == last else 2))
    refused_on_every_rank(ctx, ValueError, "disagree on hidden_grad_reduced", lambda: sharded_linear_call(
        ctx, problem, one_teacher=True, group=group, reduce_hidden_grad=ctx.rank != last))
    refused_on_every_rank(ctx, ValueError, "disagree on teachers", lambda: sharded_linear_call(
        ctx, problem, one_teacher=ctx.rank == 0, group=group))
    narrower = problem.teacher_weight[:-1] if ctx.rank == last else problem.teacher_weight
    refused_on_every_rank(ctx, ValueError, f"rank {last} .* refused its inputs: ValueError: teacher_weight has V",
                          lambda: sharded_linear_call(ctx, problem._replace(teacher_weight=narrower),
                                                      one_teacher=False, group=group))
    refused_on_every_rank(ctx, TypeError, "process_group must be a torch.distributed.ProcessGroup",
                          lambda: fused_linear_anchored_residual_kl(
                              problem.student_hidden, problem.student_weight, problem.partial_hidden,
                              problem.full_hidden, problem.teacher_weight, process_group="tp"))
    half = whole_linear_problem(5, ctx.world_size, torch.bfloat16)
    refused_on_every_rank(ctx, ValueError, "disagree on logits_dtype", lambda: sharded_linear_call(
        ctx, half, one_teacher=False, group=group, logits_dtype=torch.bfloat16 if ctx.rank == last else None))
    # still in step: the loss equals the single-process call's on the whole weights, also with bfloat16 logits
    for whole_problem, logits_dtype in ((problem, None), (half, torch.bfloat16)):
        (_, _), loss, _ = sharded_linear_call(ctx, whole_problem, one_teacher=False, group=group,
                                              logits_dtype=logits_dtype)
        expected = fused_linear_anchored_residual_kl(
            whole_problem.student_hidden, whole_problem.student_weight, whole_problem.partial_hidden,
            whole_problem.full_hidden, whole_problem.teacher_weight, **whole_problem.kwargs, logits_dtype=logits_dtype)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# --- in this process ------------------------------------------------------------------------------------


def test_a_backend_without_the_shard_stages_is_refused_by_name_and_auto_falls_back(monkeypatch):
    stageless = types.ModuleType("aropd_kernels.stageless")
    stageless.compute_rows = None  # a backend of the per-row contract only
    monkeypatch.setitem(sys.modules, "aropd_kernels.stageless", stageless)
    with pytest.raises(ValueError, match="backend='stageless' cannot run on a vocabulary shard .* shard_normalizers"):
        distributed.stage_module("stageless")
    assert distributed._shard_backend("auto", "stageless") == "reference"
    with pytest.raises(ValueError, match="stageless"):
        distributed._shard_backend("stageless", "stageless")
    assert distributed._shard_backend("auto", "reference") == "reference"


def test_fingerprints_tell_tensors_apart_by_value_and_position():
    labels = torch.tensor([5, -100, 7, 1000, 0])
    assert distributed.fingerprint(labels) == distributed.fingerprint(labels.clone())
    changed, swapped = labels.clone(), labels[[2, 1, 0, 3, 4]]
    changed[3] += 1
    for other in (changed, swapped, labels[:-1]):
        assert distributed.fingerprint(other) != distributed.fingerprint(labels)
    weights = torch.tensor([0.5, 1.0, 2.0])
    assert distributed.fingerprint(weights) != distributed.fingerprint(torch.nextafter(weights, weights + 1))
    mask = torch.tensor([True, False, True])
    assert distributed.fingerprint(mask) != distributed.fingerprint(~mask)


# --- the launch ------------------------------------------------------------------------------------------


def _rank_main(rank: int, launched: int, port: int, out_dir: str, plan: list[tuple[int, str]]) -> None:
    """Runs each (world size, check) of ``plan`` on ranks [0, world size) of the ``launched`` ones."""
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=launched,
                            timeout=STEP_TIMEOUT)
    results, backends = {}, tuple(stage_backends())
    try:
        for world_size, name in plan:
            members = list(range(world_size))
            groups = (dist.new_group(members, timeout=COLLECTIVE_TIMEOUT),
                      dist.new_group(members, timeout=BAD_INPUT_TIMEOUT))
            if rank < world_size:
                key, started = f"{world_size}:{name}", time.perf_counter()
                try:
                    CHECKS[name](Rank(rank, world_size, *groups, backends))
                    results[key] = {"status": "ok"}
                except Exception:  # noqa: BLE001 -- reported to the parent; the other checks still run
                    results[key] = {"status": "failed", "traceback": traceback.format_exc()}
                results[key]["seconds"] = round(time.perf_counter() - started, 2)
                Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
                for group in groups:
                    dist.destroy_process_group(group)
            dist.barrier()  # in step again, even after a check that failed on some ranks only
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _nothing_listens_on(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
    return True


def launch(plan: list[tuple[int, str]], out_dir: Path) -> dict[str, dict[int, dict]]:
    """Runs each (world size, check) of ``plan`` on spawned ranks; {"world size:check": {rank: result}}."""
    port, launched = _free_port(), max(world_size for world_size, _ in plan)
    context = torch.multiprocessing.start_processes(
        _rank_main, args=(launched, port, str(out_dir), plan), nprocs=launched, join=False, start_method="spawn")
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{launched} ranks did not finish within {LAUNCH_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(10)
    assert not any(process.is_alive() for process in context.processes)
    assert _nothing_listens_on(port), f"port {port} still has a listener after the ranks exited"
    results = {f"{world_size}:{name}": {} for world_size, name in plan}
    for rank in range(launched):
        path = out_dir / f"rank{rank}.json"
        for key, result in (json.loads(path.read_text()) if path.exists() else {}).items():
            results[key][rank] = result
    return results


def assert_passed(results: dict[str, dict[int, dict]], name: str, world_size: int) -> None:
    by_rank = results[f"{world_size}:{name}"]
    missing = [rank for rank in range(world_size) if rank not in by_rank]
    assert not missing, f"ranks {missing} never reported {name}"
    failures = [f"rank {rank}:\n{result['traceback']}" for rank, result in sorted(by_rank.items())
                if result["status"] != "ok"]
    assert not failures, "\n".join(failures)


WORLD_SIZES = (2, 3)


@pytest.fixture(scope="module")
def launched_checks(tmp_path_factory):
    """One launch of three ranks runs every check on all three, then on ranks 0 and 1."""
    plan = [(world_size, name) for world_size in sorted(WORLD_SIZES, reverse=True) for name in CHECKS]
    return launch(plan, tmp_path_factory.mktemp("ranks"))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CHECKS))
def test_vocabulary_parallel(launched_checks, name, world_size):
    assert_passed(launched_checks, name, world_size)


def test_the_torchrun_demo_prints_the_single_process_loss():
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(port), str(EXAMPLES / "vocab_parallel_demo.py")]
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a timeout kills every rank
    try:
        out, err = demo.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(demo.pid, signal.SIGKILL)
        demo.communicate()
        raise
    assert demo.returncode == 0, out + err
    losses = re.search(r"vocab-parallel loss (\S+)\s+single process (\S+)", out)
    assert losses and float(losses.group(1)) == pytest.approx(float(losses.group(2)), rel=1e-5), out
    assert out.strip().endswith("match")
    assert _nothing_listens_on(port)
