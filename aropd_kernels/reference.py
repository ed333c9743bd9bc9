"""Pure-torch reference: the executable specification.

It materializes every N×V intermediate, so it is for correctness tests, float64 checks and small
inputs, not for training at scale. Every other backend is held against it and against the float64
gold of the tests. It implements the per-row contract of :mod:`aropd_kernels.backends` as the four
shard stages of :mod:`aropd_kernels.shards` run on one shard, the whole vocabulary, so that the
single-process and the vocabulary-parallel paths are one computation.
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch

from . import shards
from .backends import RowResult

NEG_INF = float("-inf")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (exact checks), float32 otherwise (SPEC §4)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _xlogy_where(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weight * value with 0 * anything = 0, so -inf padding (weight 0) never yields NaN.

    The test is ``weight == 0``, not ``weight > 0``, so a NaN weight still propagates (SPEC §5).
    """
    return torch.where(weight == 0, torch.zeros_like(value), weight * value)


def _scaled_residual(log_partial: torch.Tensor, log_full: torch.Tensor, lam: float, clip: float) -> torch.Tensor:
    """lam * clamp(lf - la, -c, c) with the -inf conventions of docs/math.md.

    A token the anchor forbids (la = -inf) stays forbidden, so its residual is 0 (z = -inf anyway).
    A token only the full teacher forbids has residual -c; with c = inf that forbids it in the target
    for lam > 0 and leaves it alone for lam = 0 (no 0 * inf = NaN). NaN still propagates.
    """
    residual = (log_full - log_partial).clamp(-clip, clip)
    residual = torch.where(log_partial == NEG_INF, torch.zeros_like(residual), residual)
    forbidden_by_full = NEG_INF if lam > 0 else 0.0
    return torch.where(residual == NEG_INF, torch.full_like(residual, forbidden_by_full), lam * residual)


def anchored_residual_target(
    partial_teacher_logits: torch.Tensor,
    full_teacher_logits: torch.Tensor,
    *,
    lam: float = 1.0,
    clip: float = 5.0,
    temperature: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Target log-probabilities ``log q`` of SPEC §1, shape ``[..., V]``, float32 (float64 for float64 input).

    ``log q = log_softmax(la + lam * clamp(lf - la, -clip, clip))`` with ``la``, ``lf`` the
    log-softmax of the partial and full teacher logits at ``temperature`` (a float, or a tensor of
    shape ``[...]`` with one temperature per token). Materializes N×V tensors: meant for inspection.
    """
    dtype = _compute_dtype(partial_teacher_logits, full_teacher_logits)
    inv_temperature = _inverse_temperature(temperature, partial_teacher_logits, dtype)
    log_partial = torch.log_softmax(partial_teacher_logits.to(dtype) * inv_temperature, dim=-1)
    log_full = torch.log_softmax(full_teacher_logits.to(dtype) * inv_temperature, dim=-1)
    target = log_partial + _scaled_residual(log_partial, log_full, lam, clip)
    return torch.log_softmax(target, dim=-1)


def _inverse_temperature(temperature, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | float:
    if isinstance(temperature, torch.Tensor):
        return (1.0 / temperature.to(device=like.device, dtype=dtype)).unsqueeze(-1)
    return 1.0 / float(temperature)


class _Rows(NamedTuple):
    """The active rows of a problem as ``[n_active, V]`` tensors in the compute dtype."""

    indices: torch.Tensor  # positions of the active rows in [N]
    inv_temperature: torch.Tensor  # [n_active, 1]
    inputs: tuple[torch.Tensor, ...]  # student, partial and full logits (student, teacher for one teacher)


def _active(student, partial, full, row_temperature, active) -> _Rows:
    """Skipped rows do no work: every stage runs on the active rows only."""
    inputs = (student, partial) if full is None else (student, partial, full)
    dtype = _compute_dtype(*inputs)
    indices = active.nonzero().squeeze(-1)
    vocab = student.shape[-1]
    rows = tuple(x.reshape(-1, vocab).index_select(0, indices).to(dtype) for x in inputs)
    inv_temperature = (1.0 / row_temperature.to(dtype)).index_select(0, indices).unsqueeze(-1)
    return _Rows(indices, inv_temperature, rows)


def _scatter(values: torch.Tensor, rows: _Rows, n_rows: int) -> torch.Tensor:
    """``[..., n_active]`` values back to ``[..., N]``, zeros at skipped rows."""
    full = values.new_zeros(values.shape[:-1] + (n_rows,))
    return full.index_copy_(-1, rows.indices, values)


def _safe_max(x: torch.Tensor) -> torch.Tensor:
    """The row max for shifting; 0 where a row is all -inf, so that -inf - -inf never makes a NaN."""
    row_max = x.amax(-1, keepdim=True)
    return torch.where(row_max == NEG_INF, torch.zeros_like(row_max), row_max)


def shard_normalizers(student, partial, full, row_temperature, active) -> torch.Tensor:
    """Per input, the raw logits' max and log sum exp((x - max) / T) over this shard (see shards)."""
    rows = _active(student, partial, full, row_temperature, active)
    stats = []
    for x in rows.inputs:
        row_max = x.amax(-1)
        log_sum = torch.log(torch.exp((x - _safe_max(x)) * rows.inv_temperature).sum(-1))
        stats.append(torch.stack([row_max, log_sum]))
    return _scatter(torch.stack(stats), rows, row_temperature.shape[0])


def _log_probs(rows: _Rows, normalizers: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Global log-probabilities (x - max) / T - log_sum of each input, from the combined normalizers:
    the shift is exact and only the difference is scaled, as in the kernels."""
    normalizers = normalizers.index_select(-1, rows.indices).to(rows.inputs[0].dtype)
    return tuple((x - norm[shards.MAX].unsqueeze(-1)) * rows.inv_temperature - norm[shards.LOG_SUM].unsqueeze(-1)
                 for x, norm in zip(rows.inputs, normalizers))


def _target_logits(log_probs: tuple[torch.Tensor, ...], lam: float, clip: float) -> torch.Tensor:
    """z: the anchored residual target's logits, or the one teacher's log-probabilities."""
    if len(log_probs) == 2:
        return log_probs[1]
    _, log_partial, log_full = log_probs
    return log_partial + _scaled_residual(log_partial, log_full, lam, clip)


def _allowed_where_forbidden(allowed: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
    """1 for rows with a token that ``allowed`` gives mass and ``forbidden`` does not (log-probabilities)."""
    return ((allowed > NEG_INF) & (forbidden == NEG_INF)).any(-1).to(allowed.dtype)


def _at_labels(values: torch.Tensor, labels: torch.Tensor | None, rows: _Rows) -> torch.Tensor:
    """values[row, label] where the label is in [0, V), else 0."""
    if labels is None:
        return torch.zeros_like(values[:, 0])
    labels = labels.index_select(0, rows.indices)
    inside = (labels >= 0) & (labels < values.shape[-1])
    picked = values.gather(-1, labels.clamp(0, values.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(inside, picked, torch.zeros_like(picked))


def shard_target_sums(student, partial, full, row_temperature, active, normalizers, labels, *, lam, clip, beta,
                      with_diagnostics) -> torch.Tensor:
    """The shard's sums of :mod:`aropd_kernels.shards` (rows named there), float64."""
    rows = _active(student, partial, full, row_temperature, active)
    log_probs = _log_probs(rows, normalizers)
    log_student = log_probs[0]
    z = _target_logits(log_probs, lam, clip)
    z_max = z.amax(-1)
    centered = z - _safe_max(z)
    weight = torch.exp(centered)
    p = log_student.exp()
    sums = torch.zeros(shards.N_TARGET_SUMS, rows.indices.shape[0], dtype=torch.float64, device=student.device)
    sums[shards.Z_MAX] = z_max
    sums[shards.Z_LOG_SUM] = torch.log(weight.sum(-1))
    kind = shards.divergence_kind(beta)
    if kind == shards.FORWARD_KL:
        sums[shards.WEIGHTED_TARGET_GAP] = _xlogy_where(weight.double(), (centered - log_student).double()).sum(-1)
        sums[shards.INFINITE_DIVERGENCE] = _allowed_where_forbidden(z, log_student)
    if kind == shards.REVERSE_KL:
        # products of the (float32) p and ls - z are exact in float64: D is what the rounded terms say
        sums[shards.STUDENT_GAP] = _xlogy_where(p.double(), (log_student - z).double()).sum(-1)
        sums[shards.STUDENT_MASS] = p.double().sum(-1)
        sums[shards.INFINITE_DIVERGENCE] = _allowed_where_forbidden(log_student, z)
    if with_diagnostics:
        sums[shards.WEIGHTED_TARGET_LOGIT] = _xlogy_where(weight.double(), centered.double()).sum(-1)
        sums[shards.STUDENT_LOG_STUDENT] = _xlogy_where(p, log_student).sum(-1)
        sums[shards.STUDENT_TOKEN] = _at_labels(log_student, labels, rows)
        sums[shards.TARGET_TOKEN_LOGIT] = _at_labels(z, labels, rows)
        if full is not None:
            _, log_partial, log_full = log_probs
            q_full = log_full.exp()
            shift = log_full - log_partial
            sums[shards.BELIEF_SHIFT] = _xlogy_where(q_full, shift).sum(-1)
            sums[shards.CLIPPED_MASS] = torch.where(shift.abs() > clip, q_full, torch.zeros_like(q_full)).sum(-1)
            sums[shards.INFINITE_SHIFT] = _allowed_where_forbidden(log_full, log_partial)
    return _scatter(sums, rows, row_temperature.shape[0])


def _student_and_target(rows: _Rows, normalizers, terms, lam, clip) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ls, z, lq) of the active rows, lq from the whole row's target log-normalizer."""
    log_probs = _log_probs(rows, normalizers)
    z = _target_logits(log_probs, lam, clip)
    lse_target = terms[shards.LSE_TARGET].index_select(0, rows.indices).unsqueeze(-1)
    # subtracted in float64 and rounded once: z and lse_target may both sit near -1e3 (a low temperature)
    return log_probs[0], z, (z.to(lse_target.dtype) - lse_target).to(z.dtype)


def _log_mixture(log_student, log_target, beta: float) -> torch.Tensor:
    """log m for m = beta q + (1 - beta) p, formed in log space."""
    return torch.logaddexp(math.log(beta) + log_target, math.log1p(-beta) + log_student)


def shard_mixture_sums(student, partial, full, row_temperature, active, normalizers, terms, *, lam, clip,
                       beta) -> torch.Tensor:
    """KL(q || m) and KL(p || m) over the shard's tokens (JSD), float64 ``[2, N]``."""
    rows = _active(student, partial, full, row_temperature, active)
    log_student, _, log_target = _student_and_target(rows, normalizers, terms, lam, clip)
    log_mixture = _log_mixture(log_student, log_target, beta)
    kl_target_mixture = _xlogy_where(log_target.exp(), log_target - log_mixture).sum(-1)
    kl_student_mixture = _xlogy_where(log_student.exp(), log_student - log_mixture).sum(-1)
    return _scatter(torch.stack([kl_target_mixture, kl_student_mixture]).double(), rows, row_temperature.shape[0])


def _split(value: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``value`` as (high, low) in ``dtype`` with high + low = value to float64's precision; low
    is 0 where high is not finite (inf - inf would make it NaN)."""
    high = value.to(dtype)
    low = torch.where(high.isfinite(), (value - high.double()).to(dtype), torch.zeros_like(high))
    return high, low


def shard_gradient(student, partial, full, row_temperature, active, normalizers, terms, grad_scale, grad_out, *,
                   lam, clip, beta) -> None:
    """Writes grad_scale / T * dD/ds of the shard's columns into ``grad_out`` (zeros at skipped rows).

    Reverse KL: p ((ls - z) - mean_gap), lse_z cancelling exactly, with mean_gap (float64) subtracted
    as high then low: where (ls - z) - high cancels (the confident token) the low part is kept.
    Forward KL: p - q. JSD: (1 - beta) p ((ls - lm) - KL(p || m)).
    """
    rows = _active(student, partial, full, row_temperature, active)
    log_student, z, log_target = _student_and_target(rows, normalizers, terms, lam, clip)
    p = log_student.exp()
    active_terms = terms.index_select(1, rows.indices)
    kind = shards.divergence_kind(beta)
    if kind == shards.REVERSE_KL:
        high, low = _split(active_terms[shards.TARGET_MEAN_GAP], z.dtype)
        score = _xlogy_where(p, ((log_student - z) - high.unsqueeze(-1)) - low.unsqueeze(-1))
    elif kind == shards.FORWARD_KL:
        score = p - log_target.exp()
    else:
        student_gap = log_student - _log_mixture(log_student, log_target, beta)
        kl_student_mixture = active_terms[shards.KL_STUDENT_MIXTURE].to(z.dtype).unsqueeze(-1)
        score = (1 - beta) * _xlogy_where(p, student_gap - kl_student_mixture)
    scale = grad_scale.to(z.dtype).index_select(0, rows.indices).unsqueeze(-1) * rows.inv_temperature
    grad_rows = torch.zeros(row_temperature.shape[0], student.shape[-1], dtype=grad_out.dtype, device=grad_out.device)
    grad_rows.index_copy_(0, rows.indices, (score * scale).to(grad_out.dtype))
    grad_out.copy_(grad_rows.view(grad_out.shape))


def compute_rows(student, partial, full, row_temperature, active, grad_scale, grad_out, *, lam, clip, beta,
                 with_diagnostics, labels=None) -> RowResult:
    """The per-row contract of :func:`aropd_kernels.backends.compute_rows`: the shard stages over the
    whole vocabulary."""
    return shards.run_stages(sys.modules[__name__], student, partial, full, row_temperature, active, grad_scale,
                             grad_out, lam=lam, clip=clip, beta=beta, with_diagnostics=with_diagnostics,
                             labels=labels)
