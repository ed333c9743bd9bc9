"""fused_linear_anchored_residual_kl against a float64 gold whose logits are computed in float64 from the
same hidden states and weights; its gradients under autograd; torch.compile; bad input; memory rules."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

import aropd_kernels
from aropd_kernels import (
    DoubleBackwardError, FusedLinearAnchoredResidualKL, FusedLinearDistillationDivergence, anchored_residual_kl,
    backends, distillation_divergence, fused_linear_anchored_residual_kl, fused_linear_distillation_divergence,
)
from aropd_kernels import fused_linear
from conftest import (
    GRAD_ERROR_FACTOR, GRAD_ERROR_FLOOR, assert_grad_close, assert_loss_close, backends_under_test, device_for, gold,
    gold_token_logprobs, grad_errors, half_precision_rounding,
)
from strategies import LinearProblem, linear_problems


def row_kernel_supports(backend: str, *, one_teacher: bool = False, labels: bool = False) -> bool:
    """Whether the backend's row kernel takes one teacher (``full=None``) and labels, asked on one row of
    two logits: a kernel that does not implement them yet raises NotImplementedError."""
    device = device_for(backend)
    logits = torch.zeros(1, 1, 2, device=device)
    try:
        backends.compute_rows(backend, logits, logits, None if one_teacher else logits, torch.ones(1, device=device),
                              torch.ones(1, dtype=torch.bool, device=device), None, None, lam=0.0, clip=1.0, beta=1.0,
                              with_diagnostics=True,
                              labels=torch.zeros(1, dtype=torch.int64, device=device) if labels else None)
    except NotImplementedError:
        return False
    return True


# the backends whose row kernels take labels (the drawn problems may have them), and one teacher too
LABEL_BACKENDS = [b for b in backends_under_test() if row_kernel_supports(b, labels=True)]
ONE_TEACHER_BACKENDS = [b for b in LABEL_BACKENDS if row_kernel_supports(b, one_teacher=True, labels=True)]


# --- the gold --------------------------------------------------------------------------------------


def _logits(hidden, weight, bias, scale, softcap):
    """softcap · tanh(scale · (h Wᵀ + b) / softcap), in the dtype of its (autograd) inputs."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits * scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _flat(tensor, width=None):
    if not isinstance(tensor, torch.Tensor):
        return tensor
    return tensor.reshape(-1) if width is None else tensor.reshape(-1, width)


def _active(problem: LinearProblem) -> torch.Tensor:
    kwargs, n_rows = problem.kwargs, problem.student_hidden.shape[:-1].numel()
    active = torch.ones(n_rows, dtype=torch.bool)
    if "mask" in kwargs:
        active &= _flat(kwargs["mask"])
    if "labels" in kwargs:
        active &= _flat(kwargs["labels"]) != -100
    return active


def expected_row_scale(problem: LinearProblem) -> torch.Tensor:
    """Each row's share of the reduced loss, from the reduction's definition (SPEC §3)."""
    kwargs = problem.kwargs
    active = _active(problem).double()
    scale = active * (_flat(kwargs["weights"]).double() if "weights" in kwargs else 1.0)
    items = kwargs.get("num_items_in_batch")
    if kwargs["reduction"] == "batchmean":
        scale = scale / (items if items is not None else max(active.sum().item(), 1.0))
    elif kwargs["reduction"] == "seq_mean":
        per_sequence = active.view(problem.student_hidden.shape[:-1])
        counts = per_sequence.sum(-1, keepdim=True)
        sequences = items if items is not None else max((counts > 0).sum().item(), 1)
        scale = (scale.view_as(per_sequence) / counts.clamp(min=1) / sequences).reshape(-1)
    return scale


class Expected:
    """Per-row losses and diagnostics, and the gradients of sum(row_scale · D) w.r.t. the student's hidden
    states, weight and bias, all computed in ``dtype`` (float64: the gold; float32: plain torch).
    ``one_teacher``: the target is the partial view's softmax (lam = 0, no clip)."""

    def __init__(self, problem: LinearProblem, dtype: torch.dtype, one_teacher: bool = False):
        kwargs = problem.kwargs
        projection = (kwargs["logit_scale"], kwargs["logit_softcap"])
        leaves = [t.detach().to(dtype).requires_grad_(True) if t is not None else None
                  for t in (problem.student_hidden, problem.student_weight, kwargs.get("student_bias"))]
        vocab = problem.student_weight.shape[0]
        student = _flat(_logits(*leaves, *projection), vocab)
        with torch.no_grad():
            teacher = [_flat(_logits(h.to(dtype), problem.teacher_weight.to(dtype),
                                     None if kwargs.get("teacher_bias") is None else kwargs["teacher_bias"].to(dtype),
                                     *projection), vocab)
                       for h in (problem.partial_hidden, problem.full_hidden)]
        grad_logits = self._gold_of_logits(problem, student.detach(), teacher, dtype, one_teacher)
        wanted = [leaf for leaf in leaves if leaf is not None]
        self.grads = list(torch.autograd.grad(student, wanted, grad_logits, allow_unused=True))
        self.grads = [torch.zeros_like(w) if g is None else g for g, w in zip(self.grads, wanted)]

    def _gold_of_logits(self, problem: LinearProblem, student: torch.Tensor, teacher: list, dtype: torch.dtype,
                        one_teacher: bool) -> torch.Tensor:
        """Sets the loss, diagnostics, token log-probabilities and row scale of these ``[N, V]`` logits;
        returns the gradient of sum(row_scale · D) w.r.t. the student logits, in ``dtype``."""
        kwargs = problem.kwargs
        if one_teacher:
            kwargs = {**kwargs, "lam": 0.0, "clip": math.inf}
            teacher = [teacher[0], teacher[0]]
        temperature = kwargs["temperature"]
        temperature = _flat(temperature).to(dtype) if isinstance(temperature, torch.Tensor) else temperature
        result = gold(student, *teacher, lam=kwargs["lam"], clip=kwargs["clip"], beta=kwargs["beta"],
                      temperature=temperature, dtype=dtype)
        self.loss, self.diagnostics = result.loss, result.diagnostics
        self.token_logprobs = None
        if "labels" in kwargs:
            self.token_logprobs = gold_token_logprobs(
                student, teacher[0], None if one_teacher else teacher[1], _flat(kwargs["labels"]), lam=kwargs["lam"],
                clip=kwargs["clip"], temperature=temperature)
        self.row_scale = expected_row_scale(problem)
        return result.grad.to(dtype) * self.row_scale.to(dtype).unsqueeze(-1)


def chunk_rows_of(problem: LinearProblem) -> int:
    """Rows per chunk of the drawn call: its chunk_size, or all rows (the drawn N is below every default)."""
    n_rows = problem.student_hidden.shape[:-1].numel()
    assert n_rows <= fused_linear.default_chunk_rows(1, torch.bfloat16)
    return problem.kwargs["chunk_size"] or max(n_rows, 1)


def model_logits(hidden, weight, bias, scale, softcap, chunk_rows):
    """(logits ``[N, V]``, the lm_head's output before scale and softcap) in the tensors' dtype, as a model in
    that dtype gives them: ``F.linear`` of ``chunk_rows`` rows at a time (a matmul of another number of rows
    may round a logit differently), then the scale and softcap, one rounded operation at a time."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    linear = torch.cat([F.linear(flat[start:start + chunk_rows], weight, bias)
                        for start in range(0, flat.shape[0], chunk_rows)]) if len(flat) else F.linear(flat, weight, bias)
    if softcap is not None:
        return (linear * (scale / softcap)).tanh() * softcap, linear
    return (linear * scale if scale != 1.0 else linear), linear


class ModelLogitsExpected(Expected):
    """The float64 gold of ``logits_dtype=`` (every tensor of the problem in its student's half dtype): the
    loss and diagnostics of the logits a model in that dtype gives, and the gradients of the hidden states,
    weight and bias by the float64 chain rule from the gold gradient of those logits."""

    def __init__(self, problem: LinearProblem, one_teacher: bool = False):
        kwargs, rows = problem.kwargs, chunk_rows_of(problem)
        projection = (kwargs["logit_scale"], kwargs["logit_softcap"])
        student, linear = model_logits(problem.student_hidden, problem.student_weight, kwargs.get("student_bias"),
                                       *projection, rows)
        teacher = [model_logits(h, problem.teacher_weight, kwargs.get("teacher_bias"), *projection, rows)[0].double()
                   for h in (problem.partial_hidden, problem.full_hidden)]
        grad_logits = self._gold_of_logits(problem, student.double(), teacher, torch.float64, one_teacher)
        scale, softcap = projection
        derivative = scale if softcap is None else scale * (1 - torch.tanh(linear.double() * (scale / softcap)) ** 2)
        grad_linear = grad_logits * derivative
        hidden = problem.student_hidden.double().reshape(-1, problem.student_hidden.shape[-1])
        self.grad_linear, self.hidden = grad_linear, hidden  # each row's share of the weight gradient
        self.grads = [(grad_linear @ problem.student_weight.double()).reshape(problem.student_hidden.shape),
                      grad_linear.t() @ hidden]
        if kwargs.get("student_bias") is not None:
            self.grads.append(grad_linear.sum(0))


def model_autograd_grads(problem: LinearProblem, one_teacher: bool) -> list[torch.Tensor]:
    """The gradients a trainer in the problem's half dtype gets: autograd through F.linear and the
    projection in that dtype, and the package's loss of those logits. The baseline of the gradient rule."""
    kwargs = problem.kwargs
    leaves = [t.detach().clone().requires_grad_(True) for t in
              (problem.student_hidden, problem.student_weight, kwargs.get("student_bias")) if t is not None]
    projection = (kwargs["logit_scale"], kwargs["logit_softcap"])
    rows = max(problem.student_hidden.shape[:-1].numel(), 1)
    student, _ = model_logits(leaves[0], leaves[1], leaves[2] if len(leaves) > 2 else None, *projection, rows)
    teacher = [model_logits(h, problem.teacher_weight, kwargs.get("teacher_bias"), *projection, rows)[0]
               for h in (problem.partial_hidden, problem.full_hidden)]
    temperature = kwargs["temperature"]
    common = dict(beta=kwargs["beta"], temperature=_flat(temperature) if isinstance(temperature, torch.Tensor)
                  else temperature, mask=_active(problem), weights=expected_row_scale(problem).float(),
                  reduction="sum", backend="reference")
    if one_teacher:
        loss = distillation_divergence(student, teacher[0], **common)
    else:
        loss = anchored_residual_kl(student, *teacher, lam=kwargs["lam"], clip=kwargs["clip"], **common)
    return list(torch.autograd.grad(loss, leaves))


def in_one_dtype(problem: LinearProblem) -> LinearProblem:
    """The problem with every tensor in its student's dtype, as ``logits_dtype=`` requires."""
    dtype = problem.student_hidden.dtype
    kwargs = {name: value.to(dtype) if name in ("student_bias", "teacher_bias") else value
              for name, value in problem.kwargs.items()}
    return problem._replace(partial_hidden=problem.partial_hidden.to(dtype), full_hidden=problem.full_hidden.to(dtype),
                            teacher_weight=problem.teacher_weight.to(dtype), kwargs=kwargs)


def without(kwargs: dict, name: str) -> dict:
    return {key: value for key, value in kwargs.items() if key != name}


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def floor_units(problem: LinearProblem, row_scale, row_temperature, active) -> list[float]:
    """The gradient rule's floor unit for the hidden states, weight and bias: the logits gradient's unit
    w_i / T_i (times the logit scale; the softcap's derivative is at most 1) carried through the chain
    rule by the triangle inequality: sum_v |W_vj| for a hidden state, sum_i unit_i |h_ij| for the weight,
    sum_i unit_i for the bias."""
    row_units = torch.where(active, row_scale.abs() / row_temperature, 0.0) * problem.kwargs["logit_scale"]
    hidden = problem.student_hidden.double().reshape(len(active), problem.student_hidden.shape[-1])
    weight_l1 = problem.student_weight.double().abs().sum(0).max().item()
    return [row_units.max().item() * weight_l1 if len(active) else 0.0,
            (row_units @ hidden.abs()).max().item() if len(active) else 0.0,
            row_units.sum().item()]


def running_sum_rounding(expected: ModelLogitsExpected, active: torch.Tensor, chunk_rows: int) -> float:
    """The most a weight gradient summed in bfloat16 may lose to its sums: half a bfloat16 ulp (2^-8
    relative) of the running sum's largest entry after each chunk with an active row."""
    bound, total = 0.0, torch.zeros_like(expected.grads[1])
    for start in range(0, len(active), chunk_rows):
        rows = slice(start, start + chunk_rows)
        if active[rows].any():
            total += expected.grad_linear[rows].t() @ expected.hidden[rows]
            bound += 2.0**-8 * total.abs().max().item()
    return bound


def rounded_logits_gradient_allowances(expected: ModelLogitsExpected, problem: LinearProblem) -> list[torch.Tensor]:
    """Per entry of the hidden-state, weight and bias gradients (shaped as the checks see them): twice
    half an ulp of the logits' dtype times the absolute-value product of the gold logits' gradient,
    what rounding that gradient moves them by (see :func:`conftest.half_precision_rounding`)."""
    rounding = 2 * half_precision_rounding(problem.student_hidden.dtype)
    magnitude = expected.grad_linear.abs()
    hidden = magnitude @ problem.student_weight.double().abs()
    weight = magnitude.t() @ expected.hidden.abs()
    bias = magnitude.sum(0).reshape(-1, 1)
    return [rounding * t for t in (hidden, weight, bias)]


def check_against_gold(problem: LinearProblem, backend: str, one_teacher: bool = False,
                       model_dtype_logits: bool = False, sum_in_weight_dtype: bool = False) -> None:
    """The anchored call, or with ``one_teacher`` the one-teacher call on the partial view, against the gold;
    with ``model_dtype_logits``, called with ``logits_dtype=`` the problem's one dtype, against the gold of
    the logits a model in that dtype gives; with ``sum_in_weight_dtype`` also ``accum_dtype=`` that dtype,
    the weight gradient's error allowed one rounding of its running sum per chunk."""
    device = device_for(backend)
    kwargs = {name: _to(value, device) for name, value in problem.kwargs.items()
              if not (one_teacher and name in ("lam", "clip"))}
    if model_dtype_logits:
        kwargs["logits_dtype"] = problem.student_hidden.dtype
    if sum_in_weight_dtype:
        kwargs["accum_dtype"] = problem.student_weight.dtype
    student = [problem.student_hidden.to(device, copy=True).requires_grad_(True),
               problem.student_weight.to(device, copy=True).requires_grad_(True)]
    if kwargs.get("student_bias") is not None:
        kwargs["student_bias"] = kwargs["student_bias"].clone().requires_grad_(True)
        student.append(kwargs["student_bias"])
    views = (problem.partial_hidden,) if one_teacher else (problem.partial_hidden, problem.full_hidden)
    teacher = [t.to(device) for t in (*views, problem.teacher_weight)]
    loss_fn = fused_linear_distillation_divergence if one_teacher else fused_linear_anchored_residual_kl
    slab_elements = problem.slab_elements or fused_linear.SLAB_ELEMENTS
    with mock.patch.object(fused_linear, "SLAB_ELEMENTS", slab_elements):
        per_token, diagnostics = loss_fn(
            student[0], student[1], *teacher, backend=backend, return_diagnostics=True,
            **{**without(kwargs, "num_items_in_batch"), "reduction": "none"})
        loss = loss_fn(student[0], student[1], *teacher, backend=backend, **kwargs)
        grads = torch.autograd.grad(loss.sum(), student)

    if model_dtype_logits:
        expected = ModelLogitsExpected(problem, one_teacher)
        baseline_grads = model_autograd_grads(problem, one_teacher)
    else:
        expected = Expected(problem, torch.float64, one_teacher)
        baseline_grads = [g.to(t.dtype) for g, t in zip(Expected(problem, torch.float32, one_teacher).grads, student)]
    active = _active(problem)
    weights = _flat(problem.kwargs["weights"]).double() if "weights" in problem.kwargs else torch.ones(len(active))
    assert_loss_close(_flat(per_token), torch.where(active, expected.loss * weights, 0.0), "per-token loss")
    for name, actual, wanted in zip(diagnostics._fields, diagnostics, expected.diagnostics):
        if one_teacher and name in ("belief_shift", "clipped_mass"):
            assert actual is None, name
            continue
        assert actual.dtype == torch.float32
        assert_loss_close(_flat(actual), torch.where(active, wanted, 0.0), name)
    token_fields = (diagnostics.student_token_logprob, diagnostics.target_token_logprob)
    if expected.token_logprobs is None:
        assert token_fields == (None, None)
    else:
        for name, actual, wanted in zip(("student_token_logprob", "target_token_logprob"), token_fields,
                                        expected.token_logprobs):
            assert actual.dtype == torch.float32 and actual.shape == problem.student_hidden.shape[:-1]
            assert_loss_close(_flat(actual), torch.where(active, wanted, 0.0), name)
    scaled = expected.loss * expected.row_scale
    assert_loss_close(loss.reshape(-1), scaled if problem.kwargs["reduction"] == "none" else scaled.sum().reshape(1),
                      "loss")

    temperature = problem.kwargs["temperature"]
    row_temperature = (_flat(temperature).double() if isinstance(temperature, torch.Tensor)
                       else torch.full((len(active),), float(temperature), dtype=torch.float64))
    units = floor_units(problem, expected.row_scale, row_temperature, active)
    allowances = rounded_logits_gradient_allowances(expected, problem) if model_dtype_logits else None
    for index, (actual, wanted, baseline) in enumerate(zip(grads, expected.grads, baseline_grads)):
        assert actual.dtype == student[index].dtype and actual.shape == student[index].shape
        # rows of H entries for hidden states and weight, one entry per row for the bias
        actual, wanted, baseline = (t.reshape(-1, t.shape[-1] if t.dim() > 1 else 1) for t in (actual, wanted, baseline))
        if index == 1 and sum_in_weight_dtype:
            max_abs, _ = grad_errors(actual.cpu(), wanted, free=half_precision_rounding(actual.dtype),
                                     allowance=allowances[index])
            allowed = (GRAD_ERROR_FACTOR * grad_errors(baseline.cpu(), wanted)[0] + GRAD_ERROR_FLOOR * units[1]
                       + running_sum_rounding(expected, active, chunk_rows_of(problem)))
            assert max_abs <= allowed, f"weight gradient summed in bfloat16: error {max_abs:.3e} > {allowed:.3e}"
            continue
        if model_dtype_logits:
            assert_grad_close(actual.cpu(), wanted, baseline.cpu(), units[index],
                              free=half_precision_rounding(actual.dtype), allowance=allowances[index])
        else:
            assert_grad_close(actual.cpu(), wanted, baseline.cpu(), units[index])
    hidden_grad = grads[0].reshape(len(active), grads[0].shape[-1])
    assert torch.all(hidden_grad[~active.to(hidden_grad.device)] == 0), "skipped rows: exact zero gradient"


@pytest.mark.parametrize("backend", LABEL_BACKENDS)
@given(problem=linear_problems())
def test_backend_matches_float64_gold(backend, problem):
    check_against_gold(problem, backend)


@pytest.mark.parametrize("backend", ONE_TEACHER_BACKENDS)
@given(problem=linear_problems())
def test_one_teacher_matches_float64_gold(backend, problem):
    check_against_gold(problem, backend, one_teacher=True)


@pytest.mark.parametrize("one_teacher", [False, True], ids=["anchored", "one teacher"])
@given(problem=linear_problems(dtypes=(torch.float64,)))
def test_reference_in_float64_matches_gold(problem, one_teacher):
    check_against_gold(problem, "reference", one_teacher)


@pytest.mark.parametrize("backend", LABEL_BACKENDS)
@given(problem=linear_problems(dtypes=(torch.bfloat16, torch.float16)))
def test_model_dtype_logits_match_the_gold_of_those_logits(backend, problem):
    check_against_gold(in_one_dtype(problem), backend, model_dtype_logits=True)


@pytest.mark.parametrize("backend", ONE_TEACHER_BACKENDS)
@given(problem=linear_problems(dtypes=(torch.bfloat16, torch.float16)))
def test_one_teacher_model_dtype_logits_match_the_gold_of_those_logits(backend, problem):
    check_against_gold(in_one_dtype(problem), backend, one_teacher=True, model_dtype_logits=True)


@pytest.mark.parametrize("one_teacher", [False, True], ids=["anchored", "one teacher"])
@pytest.mark.parametrize("backend", ONE_TEACHER_BACKENDS)
@given(problem=linear_problems(dtypes=(torch.bfloat16,)))
def test_weight_gradient_summed_in_bfloat16_loses_at_most_a_rounding_per_chunk(backend, problem, one_teacher):
    check_against_gold(in_one_dtype(problem), backend, one_teacher=one_teacher, model_dtype_logits=True,
                       sum_in_weight_dtype=True)


# --- fixed problems ----------------------------------------------------------------------------------


def _inputs(batch=(2, 5), student_size=12, teacher_size=9, vocab=41, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, std=1.0):
        return (torch.randn(shape, generator=generator) * std).to(dtype)

    return (normal(*batch, student_size), normal(vocab, student_size, std=3 / math.sqrt(student_size)),
            normal(*batch, teacher_size), normal(*batch, teacher_size), normal(vocab, teacher_size, std=0.8))


def _student_leaves(inputs, bias=None):
    leaves = [inputs[0].clone().requires_grad_(True), inputs[1].clone().requires_grad_(True)]
    if bias is not None:
        leaves.append(bias.clone().requires_grad_(True))
    return leaves


def _call(leaves, inputs, **kwargs):
    bias = {"student_bias": leaves[2]} if len(leaves) > 2 else {}
    return fused_linear_anchored_residual_kl(leaves[0], leaves[1], *inputs[2:], **bias, **kwargs)


def test_exported_from_the_package():
    assert aropd_kernels.fused_linear_anchored_residual_kl is fused_linear_anchored_residual_kl
    assert aropd_kernels.fused_linear_distillation_divergence is fused_linear_distillation_divergence
    assert {"FusedLinearAnchoredResidualKL", "FusedLinearDistillationDivergence"} <= set(aropd_kernels.__all__)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10, 64])
def test_the_chunk_size_does_not_change_the_result(backend, chunk_size):
    inputs = _inputs(dtype=torch.bfloat16)
    bias = torch.randn(41, generator=torch.Generator().manual_seed(1)).bfloat16()
    results = []
    for chunk in (None, chunk_size):
        leaves = _student_leaves(inputs, bias)
        loss = _call(leaves, inputs, chunk_size=chunk, backend=backend, logit_softcap=5.0)
        results.append((loss, *torch.autograd.grad(loss, leaves)))
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected)


def test_matches_the_unfused_call_on_float32_logits(backend):
    inputs = _inputs(teacher_size=12)
    leaves = _student_leaves(inputs)
    fused = _call(leaves, inputs, lam=0.7, beta=0.3, backend=backend)
    fused_grads = torch.autograd.grad(fused, leaves)
    unfused_leaves = _student_leaves(inputs)
    teacher = inputs[4]
    unfused = anchored_residual_kl(unfused_leaves[0] @ unfused_leaves[1].t(), inputs[2] @ teacher.t(),
                                   inputs[3] @ teacher.t(), lam=0.7, beta=0.3, backend=backend)
    torch.testing.assert_close(fused, unfused)
    for actual, expected in zip(fused_grads, torch.autograd.grad(unfused, unfused_leaves)):
        torch.testing.assert_close(actual, expected)


def test_each_tensor_keeps_its_own_dtype():
    """bfloat16 hidden states with a float32 weight (and the reverse for the teacher): the logits are those
    of the values as given, and each gradient comes back in its tensor's dtype."""
    inputs = _inputs()
    mixed = [inputs[0].bfloat16(), inputs[1], inputs[2], inputs[3], inputs[4].bfloat16()]
    exact = [mixed[0].float(), mixed[1], mixed[2], mixed[3], mixed[4].float()]
    leaves, exact_leaves = _student_leaves(mixed), _student_leaves(exact)
    loss, expected = _call(leaves, mixed), _call(exact_leaves, exact)
    torch.testing.assert_close(loss, expected)
    grads, expected_grads = torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, exact_leaves)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32]
    torch.testing.assert_close(grads[0], expected_grads[0].bfloat16())
    torch.testing.assert_close(grads[1], expected_grads[1])


def test_module_stores_its_arguments():
    inputs = _inputs()
    module = FusedLinearAnchoredResidualKL(lam=0.7, clip=2.0, logit_softcap=4.0, reduction="sum")
    assert "logit_softcap=4.0" in repr(module)
    torch.testing.assert_close(module(*inputs), fused_linear_anchored_residual_kl(
        *inputs, lam=0.7, clip=2.0, logit_softcap=4.0, reduction="sum"))


@pytest.mark.parametrize("backend", ONE_TEACHER_BACKENDS)
def test_one_teacher_matches_the_unfused_call_and_reads_one_teacher_block(backend):
    """One matmul of the teacher's [R, H_t] rows per weight slab, and the unfused one-teacher call's numbers."""
    inputs = _inputs(teacher_size=12)
    teacher_hidden, teacher_weight = inputs[2], inputs[4]
    labels = torch.tensor([[3, -100, 40, 0, 7], [1, 2, -100, 5, 6]])
    leaves = _student_leaves(inputs)
    with mock.patch.object(fused_linear, "teacher_logits", wraps=fused_linear.teacher_logits) as teachers:
        fused, diagnostics = fused_linear_distillation_divergence(
            *leaves, teacher_hidden, teacher_weight, beta=0.3, labels=labels, chunk_size=4, return_diagnostics=True,
            backend=backend)
    assert teachers.call_count == 3 and all(len(call.args[0]) == 1 for call in teachers.call_args_list)
    unfused_leaves = _student_leaves(inputs)
    unfused, unfused_diagnostics = distillation_divergence(
        unfused_leaves[0] @ unfused_leaves[1].t(), teacher_hidden @ teacher_weight.t(), beta=0.3, labels=labels,
        return_diagnostics=True, backend=backend)
    torch.testing.assert_close(fused, unfused)
    for name in ("student_entropy", "target_entropy", "student_token_logprob", "target_token_logprob"):
        torch.testing.assert_close(getattr(diagnostics, name), getattr(unfused_diagnostics, name))
    assert diagnostics.belief_shift is None and diagnostics.clipped_mass is None
    for actual, expected in zip(torch.autograd.grad(fused, leaves), torch.autograd.grad(unfused, unfused_leaves)):
        torch.testing.assert_close(actual, expected)


def test_one_teacher_module_stores_its_arguments():
    inputs = _inputs()
    module = FusedLinearDistillationDivergence(beta=0.0, logit_softcap=4.0, reduction="sum", backend="reference")
    assert "beta=0.0" in repr(module)
    torch.testing.assert_close(module(inputs[0], inputs[1], inputs[2], inputs[4]), fused_linear_distillation_divergence(
        inputs[0], inputs[1], inputs[2], inputs[4], beta=0.0, logit_softcap=4.0, reduction="sum", backend="reference"))


def test_default_chunk_rows_follow_the_hidden_size():
    assert [fused_linear.default_chunk_rows(h) for h in (7, 896, 3584, 4096)] == [16, 64, 288, 336]
    for dtype in (torch.bfloat16, torch.float16):
        assert [fused_linear.default_chunk_rows(h, dtype) for h in (7, 896, 3584, 4096)] == [16, 592, 2384, 2720]
    assert [fused_linear.default_chunk_rows(h, torch.bfloat16, sum_in_weight_dtype=True)
            for h in (7, 896, 3584, 4096)] == [16, 288, 1184, 1360]
    assert fused_linear.default_chunk_rows(896, None, sum_in_weight_dtype=True) == 64


def test_weight_gradient_summed_in_bfloat16_holds_no_float32_copy():
    """accum_dtype=torch.bfloat16: the running sum is the bfloat16 result itself, the chunk's product
    added into it (one addmm_ per chunk with bfloat16 logits; float32 product slabs with float32 logits)."""
    weight = torch.zeros(41, 12, dtype=torch.bfloat16)
    for product_dtype, slabs in ((torch.bfloat16, 1), (torch.float32, 9)):
        with mock.patch.object(fused_linear, "SLAB_ELEMENTS", 5 * 12):
            gradient = fused_linear.WeightGradient(weight, torch.float32, product_dtype, in_weight_dtype=True)
        assert len(gradient.slabs) == slabs
        grad, hidden = torch.randn(3, 41), torch.randn(3, 12)
        gradient.add(grad.to(product_dtype), hidden.to(product_dtype), 0.5)
        result = gradient.result()
        assert result.dtype == torch.bfloat16
        assert all(part.untyped_storage().data_ptr() == result.untyped_storage().data_ptr() for part in gradient._parts)
        expected = 0.5 * grad.to(product_dtype).double().t() @ hidden.to(product_dtype).double()
        torch.testing.assert_close(result.double(), expected, rtol=2**-7, atol=1e-6)


def test_float32_logits_with_the_weight_gradient_summed_in_bfloat16():
    """accum_dtype=torch.bfloat16 with float32 logits: the loss and hidden-state gradient are those of
    the float32 sum, the weight gradient within one bfloat16 rounding per chunk of it."""
    inputs = _inputs(batch=(3, 7), dtype=torch.bfloat16)
    results = []
    for accum_dtype in (None, torch.bfloat16):
        leaves = _student_leaves(inputs)
        loss = _call(leaves, inputs, chunk_size=4, accum_dtype=accum_dtype)
        results.append((loss, *torch.autograd.grad(loss, leaves)))
    (loss, hidden_grad, weight_grad), (loss_b, hidden_grad_b, weight_grad_b) = results
    assert torch.equal(loss, loss_b) and torch.equal(hidden_grad, hidden_grad_b)
    chunks = 6  # 21 rows by 4
    assert weight_grad_b.dtype == torch.bfloat16
    torch.testing.assert_close(weight_grad_b.double(), weight_grad.double(), rtol=0,
                               atol=chunks * 2.0**-8 * weight_grad.double().abs().max().item())
    assert not torch.equal(weight_grad_b, torch.zeros_like(weight_grad_b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_model_dtype_logits_are_the_lm_heads_and_need_no_upcast(backend, dtype):
    """logits_dtype=: the row kernel receives exactly the logits F.linear gives in that dtype, the matmuls
    read the weights as given (no slab buffer), and the result is the unfused call's on those logits."""
    inputs = [t.to(dtype) for t in _inputs(teacher_size=12)]
    bias = torch.randn(41, generator=torch.Generator().manual_seed(2)).to(dtype)
    leaves = _student_leaves(inputs, bias)
    seen = []

    def recording(name, student, partial, full, *args, **kwargs):
        seen.append((student.clone(), partial.clone(), full.clone()))
        return real(name, student, partial, full, *args, **kwargs)

    weights = []

    class RecordedWeight(fused_linear.SlabbedWeight):
        def __init__(self, *args):
            super().__init__(*args)
            weights.append(self)

    real = backends.compute_rows
    with mock.patch.object(backends, "compute_rows", recording), \
            mock.patch.object(fused_linear, "SlabbedWeight", RecordedWeight):
        fused = _call(leaves, inputs, lam=0.7, logits_dtype=dtype, chunk_size=4, backend=backend)
        fused_grads = torch.autograd.grad(fused, leaves)
    assert len(weights) == 2 and all(weight.in_place for weight in weights)
    logits = [torch.cat([F.linear(h.reshape(-1, h.shape[-1])[start:start + 4], w, b) for start in range(0, 10, 4)])
              for h, w, b in ((leaves[0], leaves[1], leaves[2]), (inputs[2], inputs[4], None), (inputs[3], inputs[4], None))]
    for view, expected in zip(zip(*seen), logits):
        assert all(block.dtype == dtype for block in view)
        assert torch.equal(torch.cat([block.squeeze(0) for block in view]), expected.detach())
    unfused = anchored_residual_kl(*logits, lam=0.7, backend=backend)
    torch.testing.assert_close(fused, unfused)
    for actual, expected in zip(fused_grads, torch.autograd.grad(unfused, leaves)):
        assert actual.dtype == dtype
        torch.testing.assert_close(actual.float(), expected.float(), rtol=0.02, atol=2e-3)


# --- what is (not) computed ------------------------------------------------------------------------------


class _RowKernelSpy:
    """Wraps backends.compute_rows, recording whether each call was asked for a gradient."""

    def __init__(self):
        self.real = backends.compute_rows
        self.grad_outs = []

    def __call__(self, *args, **kwargs):
        self.grad_outs.append(args[7])
        return self.real(*args, **kwargs)


def test_no_grad_runs_the_forward_only():
    inputs = _inputs()
    leaves = _student_leaves(inputs)
    expected = _call(leaves, inputs).detach()
    spy = _RowKernelSpy()
    with torch.no_grad(), mock.patch.object(backends, "compute_rows", spy), \
            mock.patch.object(fused_linear, "WeightGradient", side_effect=AssertionError("a weight gradient")):
        loss = _call(leaves, inputs)
    assert not loss.requires_grad and spy.grad_outs and all(g is None for g in spy.grad_outs)
    torch.testing.assert_close(loss, expected)


def test_a_frozen_head_allocates_no_weight_gradient():
    inputs = _inputs()
    hidden = inputs[0].clone().requires_grad_(True)
    with mock.patch.object(fused_linear, "WeightGradient", side_effect=AssertionError("a weight gradient")):
        loss = fused_linear_anchored_residual_kl(hidden, *inputs[1:])
        loss.backward()
    leaves = _student_leaves(inputs)
    (expected,) = torch.autograd.grad(_call(leaves, inputs), leaves[:1])
    torch.testing.assert_close(hidden.grad, expected)


def test_chunks_without_an_active_row_do_no_matmul():
    inputs = _inputs(batch=(3, 4))
    mask = torch.tensor([[False] * 4, [True, False, False, False], [False] * 4])
    leaves = _student_leaves(inputs)
    with mock.patch.object(fused_linear, "project", wraps=fused_linear.project) as projections:
        loss = _call(leaves, inputs, mask=mask, chunk_size=4, reduction="none")
    assert projections.call_count == 2  # student and teachers of the one chunk with an active row
    assert torch.all(loss[~mask] == 0) and loss[1, 0] > 0
    loss.sum().backward()
    assert torch.all(leaves[0].grad[~mask] == 0) and leaves[0].grad[1, 0].abs().sum() > 0


def test_all_rows_skipped_gives_zero_loss_and_gradients():
    inputs = _inputs()
    leaves = _student_leaves(inputs, bias=torch.randn(41))
    loss = _call(leaves, inputs, mask=torch.zeros(2, 5, dtype=torch.bool))
    assert loss.item() == 0
    for grad in torch.autograd.grad(loss, leaves):
        assert torch.all(grad == 0)


def test_empty_batch():
    inputs = _inputs(batch=(0,))
    leaves = _student_leaves(inputs)
    loss = _call(leaves, inputs)
    assert loss.item() == 0
    assert all(torch.all(g == 0) for g in torch.autograd.grad(loss, leaves))


def test_weight_gradient_in_slabs_is_freed_slab_by_slab():
    """A bfloat16 weight's float32 gradient is accumulated in slabs that are released one by one as
    they are converted, never all beside the whole bfloat16 result."""
    inputs = _inputs(dtype=torch.bfloat16)
    leaves = _student_leaves(inputs)
    with mock.patch.object(fused_linear, "SLAB_ELEMENTS", 5 * 12):
        accumulator = fused_linear.WeightGradient(leaves[1].detach(), torch.float32, torch.float32)
        assert len(accumulator.slabs) == 9  # 41 rows by 5
        for index in range(len(accumulator.slabs)):
            accumulator.part(index).fill_(index)
        result = accumulator.result()
    assert result.dtype == torch.bfloat16 and all(part is None for part in accumulator._parts)
    assert torch.equal(result[:, 0], torch.arange(41) // 5)


# --- autograd: retained graphs, scaled losses, per-token losses, double backward, compile -------------


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_backward_with_retain_graph_accumulates_one_gradient_per_call(reduction):
    inputs = _inputs(dtype=torch.bfloat16)
    bias = torch.randn(41).bfloat16()
    leaves = _student_leaves(inputs, bias)
    expected = torch.autograd.grad(_call(leaves, inputs, reduction=reduction).sum(), leaves)
    loss = _call(leaves, inputs, reduction=reduction).sum()
    for calls in (1, 2, 3):
        loss.backward(retain_graph=True)
        for leaf, grad in zip(leaves, expected):
            torch.testing.assert_close(leaf.grad.float(), calls * grad.float(), rtol=0.01, atol=1e-6)
    first = leaves[1].grad.clone()
    leaves[1].grad = None
    loss.backward(retain_graph=True)
    assert torch.equal(leaves[1].grad, expected[1]) and not torch.equal(first, leaves[1].grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_an_incoming_gradient_is_applied_in_float32_and_rounded_once(dtype):
    inputs = _inputs(dtype=dtype)
    leaves = _student_leaves(inputs, torch.randn(41).to(dtype))
    stored = torch.autograd.grad(_call(leaves, inputs), leaves)
    scaled = torch.autograd.grad(_call(leaves, inputs) / 3, leaves)
    for actual, gradient in zip(scaled, stored):
        assert torch.equal(actual, (gradient.float() * torch.tensor(1 / 3)).to(dtype))


def test_per_token_incoming_gradients_reach_the_weight_gradient():
    """reduction='none': each token's incoming gradient weighs its rows in the weight gradient, which a
    stored gradient could not be rescaled to; the result equals the weighted sum computed directly."""
    inputs = _inputs()
    token_weights = torch.rand(2, 5, generator=torch.Generator().manual_seed(4)) * 3
    leaves = _student_leaves(inputs, torch.randn(41))
    per_token = _call(leaves, inputs, reduction="none", logit_softcap=6.0)
    actual = torch.autograd.grad((per_token * token_weights).sum(), leaves)
    expected = torch.autograd.grad(_call(leaves, inputs, reduction="sum", weights=token_weights,
                                         logit_softcap=6.0), leaves)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_double_backward_is_refused_with_a_clear_error(reduction):
    inputs = _inputs()
    leaves = _student_leaves(inputs)
    loss = _call(leaves, inputs, reduction=reduction).sum()
    with pytest.raises(DoubleBackwardError, match="does not support double backward"):
        torch.autograd.grad(loss, leaves[0], create_graph=True)


def test_float16_gradients_are_kept_in_float32_until_backward():
    inputs = _inputs(dtype=torch.float16)
    leaves = _student_leaves(inputs)
    loss = _call(leaves, inputs) * 2.0**16  # what GradScaler.scale(loss) does
    loss.backward()
    reference = _student_leaves([t.float() for t in inputs])
    (_call(reference, [t.float() for t in inputs]) * 2.0**16).backward()
    for leaf, expected in zip(leaves, reference):
        assert leaf.grad.dtype == torch.float16
        torch.testing.assert_close(leaf.grad.float(), expected.grad.half().float(), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("reduction, one_teacher, logits_dtype", [
    ("batchmean", False, None), ("none", False, None), ("batchmean", True, None), ("none", False, torch.bfloat16),
    ("batchmean", True, torch.bfloat16)])
def test_compiles_without_graph_breaks_and_matches_eager(reduction, one_teacher, logits_dtype):
    inputs = _inputs(batch=(2, 4), dtype=logits_dtype or torch.float32)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    labels = torch.tensor([[3, 0, 40, 7], [-100, 2, 5, 6]])

    def step(hidden, weight):
        if one_teacher:
            loss, diagnostics = fused_linear_distillation_divergence(
                hidden, weight, inputs[2], inputs[4], beta=0.5, mask=mask, labels=labels, logit_softcap=7.0,
                chunk_size=3, reduction=reduction, return_diagnostics=True, backend="reference",
                logits_dtype=logits_dtype)
            return loss.sum() * 1.5, diagnostics.target_token_logprob
        loss, diagnostics = fused_linear_anchored_residual_kl(
            hidden, weight, *inputs[2:], lam=0.8, clip=2.0, mask=mask, logit_softcap=7.0, chunk_size=3,
            reduction=reduction, return_diagnostics=True, logits_dtype=logits_dtype)
        return loss.sum() * 1.5, diagnostics.belief_shift

    eager, compiled = _student_leaves(inputs), _student_leaves(inputs)
    torch._dynamo.reset()
    compiled_loss, compiled_shift = torch.compile(step, fullgraph=True)(*compiled)
    eager_loss, eager_shift = step(*eager)
    compiled_loss.backward()
    eager_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_shift, eager_shift)
    for compiled_leaf, eager_leaf in zip(compiled, eager):
        torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)


# --- bad input: ValueError or TypeError before any kernel or matmul ------------------------------------


def _with(index, value):
    def build():
        inputs = list(_inputs())
        inputs[index] = value(inputs[index]) if callable(value) else value
        return inputs
    return build


BAD_INPUTS = [
    # (id, build inputs, kwargs, error, fragment of the message)
    ("hidden not a tensor", _with(0, [[1.0]]), {}, TypeError, "student_hidden must be a torch.Tensor"),
    ("integer hidden", _with(0, lambda h: h.long()), {}, TypeError, "student_hidden has dtype torch.int64"),
    ("scalar hidden", _with(0, torch.tensor(1.0)), {}, ValueError, "[..., H] with H >= 1"),
    ("empty hidden size", _with(2, torch.zeros(2, 5, 0)), {}, ValueError, "partial_teacher_hidden must have shape"),
    ("weight 1-D", _with(1, lambda w: w[0]), {}, ValueError, "student_weight must have shape [V, H]"),
    ("weight without rows", _with(1, lambda w: w[:0]), {}, ValueError, "V >= 1"),
    ("weight of another H", _with(1, lambda w: w[:, :-1]), {}, ValueError, "must match the last dimension"),
    ("teacher weight of another H", _with(4, lambda w: w[:, :-1]), {}, ValueError,
     "teacher_weight has shape (41, 8): its H = 8"),
    ("teacher vocabulary", _with(4, lambda w: w[:-1]), {}, ValueError, "share the vocabulary"),
    ("teacher rows", _with(2, lambda h: h[:, :-1]), {}, ValueError, "full_teacher_hidden has shape"),
    ("teacher rows both", lambda: [*_inputs()[:2], *(t[:, :-1] for t in _inputs()[2:4]), _inputs()[4]], {}, ValueError,
     "align the teacher's hidden states"),
    ("device", _with(3, lambda h: h.to("meta")), {}, ValueError, "full_teacher_hidden is on meta"),
    ("teacher hidden requires grad", _with(2, lambda h: h.requires_grad_(True)), {}, ValueError,
     "partial_teacher_hidden.detach()"),
    ("teacher weight requires grad", _with(4, lambda w: w.requires_grad_(True)), {}, ValueError,
     "teacher_weight.detach()"),
    ("teacher bias requires grad", _inputs, {"teacher_bias": torch.zeros(41, requires_grad=True)}, ValueError,
     "teacher_bias.detach()"),
    ("bias shape", _inputs, {"student_bias": torch.zeros(40)}, ValueError, "student_bias must have shape [V] = (41,)"),
    ("bias dtype", _inputs, {"teacher_bias": torch.zeros(41, dtype=torch.long)}, TypeError, "teacher_bias has dtype"),
    ("logit_scale zero", _inputs, {"logit_scale": 0.0}, ValueError, "logit_scale must be a finite number > 0"),
    ("logit_scale inf", _inputs, {"logit_scale": math.inf}, ValueError, "logit_scale must be"),
    ("logit_scale tensor", _inputs, {"logit_scale": torch.tensor(1.0)}, TypeError, "logit_scale must be a Python"),
    ("logit_softcap negative", _inputs, {"logit_softcap": -1.0}, ValueError, "logit_softcap must be None"),
    ("logit_softcap nan", _inputs, {"logit_softcap": math.nan}, ValueError, "logit_softcap must be None"),
    ("chunk_size zero", _inputs, {"chunk_size": 0}, ValueError, "chunk_size must be None"),
    ("chunk_size float", _inputs, {"chunk_size": 2.0}, TypeError, "chunk_size must be None or an int"),
    ("chunk_size bool", _inputs, {"chunk_size": True}, TypeError, "chunk_size must be None or an int"),
    ("lam negative", _inputs, {"lam": -1.0}, ValueError, "lam must be a finite number >= 0"),
    ("unknown reduction", _inputs, {"reduction": "mean"}, ValueError, "reduction must be one of"),
    ("seq_mean on one dimension", lambda: _inputs(batch=(6,)), {"reduction": "seq_mean"}, ValueError, "[B, T, V]"),
    ("mask shape", _inputs, {"mask": torch.ones(10, dtype=torch.bool)}, ValueError, "mask must have"),
    ("inplace_grad", _inputs, {"inplace_grad": True}, TypeError, "inplace_grad"),
    ("float64 to native", lambda: [t.double() for t in _inputs()], {"backend": "native"}, ValueError, "float64"),
    ("logits_dtype on float32 inputs", _inputs, {"logits_dtype": torch.bfloat16}, ValueError,
     "student_hidden has dtype torch.float32 but logits_dtype=torch.bfloat16"),
    ("logits_dtype of the other half", lambda: [t.half() for t in _inputs()], {"logits_dtype": torch.bfloat16},
     ValueError, "cast student_hidden with .to(torch.bfloat16), or pass logits_dtype=None"),
    ("logits_dtype with a float32 teacher weight", lambda: [*(t.bfloat16() for t in _inputs()[:4]), _inputs()[4]],
     {"logits_dtype": torch.bfloat16}, ValueError, "teacher_weight has dtype torch.float32 but logits_dtype"),
    ("logits_dtype with a float32 bias", lambda: [t.bfloat16() for t in _inputs()],
     {"logits_dtype": torch.bfloat16, "teacher_bias": torch.zeros(41)}, ValueError, "teacher_bias has dtype"),
    ("logits_dtype float32", _inputs, {"logits_dtype": torch.float32}, ValueError,
     "logits_dtype must be None (float32 logits from the tensors as given), torch.bfloat16 or torch.float16"),
    ("logits_dtype a string", lambda: [t.bfloat16() for t in _inputs()], {"logits_dtype": "bfloat16"}, TypeError,
     "logits_dtype must be None or a torch.dtype, got str"),
    ("accum_dtype a string", lambda: [t.bfloat16() for t in _inputs()], {"accum_dtype": "bfloat16"}, TypeError,
     "accum_dtype must be None or a torch.dtype, got str"),
    ("accum_dtype float16", lambda: [t.half() for t in _inputs()], {"accum_dtype": torch.float16}, ValueError,
     "accum_dtype must be None or torch.float32 (the weight gradient summed in float32), or torch.bfloat16"),
    ("accum_dtype bfloat16 for a float32 weight", _inputs, {"accum_dtype": torch.bfloat16}, ValueError,
     "student_weight has dtype torch.float32; pass accum_dtype=None"),
]


ONE_TEACHER_BAD_INPUTS = [
    ("teacher requires grad", lambda i: (i[0], i[1], i[2].requires_grad_(True), i[4]), {}, ValueError,
     "teacher_hidden.detach()"),
    ("teacher rows", lambda i: (i[0], i[1], i[2][:, :-1], i[4]), {}, ValueError, "align the teacher's hidden states"),
    ("teacher H", lambda i: (i[0], i[1], i[2][..., :-1], i[4]), {}, ValueError, "the last dimension of teacher_hidden"),
    ("lam", lambda i: (i[0], i[1], i[2], i[4]), {"lam": 0.5}, TypeError, "lam"),
    ("reduce_hidden_grad", lambda i: (i[0], i[1], i[2], i[4]), {"reduce_hidden_grad": 1}, TypeError,
     "reduce_hidden_grad must be a bool"),
    ("logits_dtype with a float32 teacher", lambda i: (i[0].bfloat16(), i[1].bfloat16(), i[2], i[4].bfloat16()),
     {"logits_dtype": torch.bfloat16}, ValueError, "teacher_hidden has dtype torch.float32 but logits_dtype"),
]


@pytest.mark.parametrize("select, kwargs, error, fragment", [c[1:] for c in ONE_TEACHER_BAD_INPUTS],
                         ids=[c[0] for c in ONE_TEACHER_BAD_INPUTS])
def test_one_teacher_bad_input_raises_before_any_kernel(select, kwargs, error, fragment):
    inputs = select(_inputs())
    with mock.patch.object(backends, "compute_rows", side_effect=AssertionError("a kernel ran")), \
            mock.patch.object(fused_linear, "chunk_loop", side_effect=AssertionError("a matmul ran")):
        with pytest.raises(error) as raised:
            fused_linear_distillation_divergence(*inputs, **kwargs)
    assert fragment in str(raised.value)


def test_dtensor_weights_are_refused_with_the_local_fix():
    inputs = _inputs()
    with mock.patch.object(aropd_kernels.functional, "is_dtensor", lambda tensor: tensor is inputs[4]):
        with pytest.raises(TypeError, match=r"teacher_weight is a DTensor; pass this rank's local tensors"):
            fused_linear_anchored_residual_kl(*inputs)


@pytest.mark.parametrize("build, kwargs, error, fragment", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_before_any_kernel(build, kwargs, error, fragment):
    inputs = build()
    with mock.patch.object(backends, "compute_rows", side_effect=AssertionError("a kernel ran")), \
            mock.patch.object(fused_linear, "chunk_loop", side_effect=AssertionError("a matmul ran")):
        with pytest.raises(error) as raised:
            fused_linear_anchored_residual_kl(*inputs, **kwargs)
    assert fragment in str(raised.value)
