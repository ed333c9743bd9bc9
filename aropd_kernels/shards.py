"""Rows whose vocabulary is split into shards: per-shard statistics, how they combine, and the stages.

A row's loss needs three things no shard of its vocabulary sees alone: the inputs' log-normalizers,
the target's log-normalizer, and the divergence's sums. A backend that runs on shards provides four
stage functions over its ``[B, T, V_r]`` views (the per-row contract of :mod:`aropd_kernels.backends`,
with ``V_r`` the shard's vocabulary):

``shard_normalizers(student, partial, full, row_temperature, active)``
    ``[n_inputs, 2, N]`` (float32; float64 for float64 input): per input (student, partial, full;
    full absent for one teacher) the shard's max of the raw logits (``MAX``) and
    ``log sum exp((x - max) / T)`` (``LOG_SUM``); -inf and -inf where the shard has only -inf.
``shard_target_sums(student, partial, full, row_temperature, active, normalizers, labels, *, lam, clip,
beta, with_diagnostics)``
    float64 ``[N_TARGET_SUMS, N]``: the shard's sums over its tokens, given the global normalizers;
    the rows are named below. ``labels`` are shard-local indices (outside ``[0, V_r)``: not here).
``shard_mixture_sums(student, partial, full, row_temperature, active, normalizers, terms, *, lam, clip,
beta)``
    float64 ``[2, N]``: KL(q || m) and KL(p || m) over the shard's tokens (JSD only).
``shard_gradient(student, partial, full, row_temperature, active, normalizers, terms, grad_scale,
grad_out, *, lam, clip, beta)``
    writes the shard's columns of the gradient, as the per-row contract does.

``terms`` is float64 ``[N_TERMS, N]`` (rows named below), made by :func:`finish_target` from the
combined sums. Every log here is natural; ``z`` is the target logit ``la + lam * clamp(lf - la, -c, c)``
(``la`` alone for one teacher) with ``la``, ``lf`` the global log-probabilities.

:func:`run_stages` sequences them. Its ``gather`` is the only communication: it stacks a tensor from
every shard along a new leading dimension (the identity for one process, an all-gather across a
vocabulary-parallel group). Infinite divergences are decided from log-probabilities (a token one side
allows and the other forbids), so an underflowing probability never turns an infinite row finite.
"""

from __future__ import annotations

from typing import Callable

import torch

from .backends import N_DIAGNOSTICS, RowResult

# rows of the normalizers' second dimension
MAX, LOG_SUM = 0, 1

# rows of shard_target_sums; "weighted" sums carry weights exp(z - Z_MAX) of the shard's own Z_MAX and
# are centered on it too: z itself may sit near -1e3 (a low temperature), where a sum of z, rounded at
# z's ulp, would cancel against log sum exp(z) in the entropy and in forward KL
Z_MAX = 0  # max of z over the shard
Z_LOG_SUM = 1  # log sum exp(z - Z_MAX)
WEIGHTED_TARGET_GAP = 2  # sum exp(z - Z_MAX) (z - Z_MAX - ls): forward KL
WEIGHTED_TARGET_LOGIT = 3  # sum exp(z - Z_MAX) (z - Z_MAX): target entropy
STUDENT_GAP = 4  # sum p (ls - z): reverse KL
STUDENT_MASS = 5  # sum p
BELIEF_SHIFT = 6  # sum q_F (lf - la)
CLIPPED_MASS = 7  # sum q_F [|lf - la| > clip]
STUDENT_LOG_STUDENT = 8  # sum p ls
STUDENT_TOKEN = 9  # ls at the label, when the label is in this shard, else 0
TARGET_TOKEN_LOGIT = 10  # z at the label, when the label is in this shard, else 0
INFINITE_DIVERGENCE = 11  # 1 where a token makes the divergence infinite (reverse: ls > -inf = z; forward: z > -inf = ls)
INFINITE_SHIFT = 12  # 1 where a token has lf > -inf = la (belief shift infinite)
N_TARGET_SUMS = 13

_WEIGHTED = (WEIGHTED_TARGET_GAP, WEIGHTED_TARGET_LOGIT)
_SUMMED = (STUDENT_GAP, STUDENT_MASS, BELIEF_SHIFT, CLIPPED_MASS, STUDENT_LOG_STUDENT, STUDENT_TOKEN,
           TARGET_TOKEN_LOGIT)
_FLAGS = (INFINITE_DIVERGENCE, INFINITE_SHIFT)

# rows of terms
LSE_TARGET = 0  # log sum exp(z) over the whole vocabulary
TARGET_MEAN_GAP = 1  # sum p (ls - z) / sum p: reverse KL is this plus LSE_TARGET
KL_STUDENT_MIXTURE = 2  # KL(p || m): JSD
N_TERMS = 3

REVERSE_KL, FORWARD_KL, JSD = "reverse_kl", "forward_kl", "jsd"


def divergence_kind(beta: float) -> str:
    """beta = 1 reverse KL, beta = 0 forward KL, in between generalized JSD (the TRL convention)."""
    return REVERSE_KL if beta == 1.0 else FORWARD_KL if beta == 0.0 else JSD


def _shifted_exp(values: torch.Tensor, maxima: torch.Tensor, new_max: torch.Tensor, scale) -> torch.Tensor:
    """exp((maxima - new_max) * scale) with 0 where a shard saw only -inf (never -inf - -inf = NaN)."""
    safe_max = torch.where(new_max == -torch.inf, torch.zeros_like(new_max), new_max)
    return torch.where(maxima == -torch.inf, torch.zeros_like(values), torch.exp((maxima - safe_max) * scale))


def combine_normalizers(gathered: torch.Tensor, row_temperature: torch.Tensor) -> torch.Tensor:
    """``[shards, n_inputs, 2, N]`` -> ``[n_inputs, 2, N]``: each input's max and log-sum over every shard.

    One shard is returned as it is, bit for bit: a single process loses no precision to the split.
    """
    if gathered.shape[0] == 1:
        return gathered[0]
    maxima, log_sums = gathered[:, :, MAX], gathered[:, :, LOG_SUM]
    row_max = maxima.amax(0)
    if torch.isnan(maxima).any():  # amax drops no NaN, but keep a NaN row NaN in the log-sum too
        row_max = torch.where(torch.isnan(maxima).any(0), torch.nan, row_max)
    # 1 / T in the statistics' dtype: a float32 reciprocal would cost float64 statistics their precision
    factor = _shifted_exp(log_sums, maxima, row_max.unsqueeze(0), 1.0 / row_temperature.to(gathered.dtype))
    log_sum = torch.log((torch.exp(log_sums) * factor).sum(0))
    return torch.stack([row_max, log_sum], dim=1)


def combine_target_sums(gathered: torch.Tensor) -> torch.Tensor:
    """``[shards, N_TARGET_SUMS, N]`` -> ``[N_TARGET_SUMS, N]``: weighted sums carried to the row's max of z
    (one shard as it is)."""
    if gathered.shape[0] == 1:
        return gathered[0]
    z_max = gathered[:, Z_MAX]
    row_z_max = z_max.amax(0)
    factor = _shifted_exp(z_max, z_max, row_z_max.unsqueeze(0), 1.0)
    combined = torch.empty_like(gathered[0])
    combined[Z_MAX] = row_z_max
    masses = torch.exp(gathered[:, Z_LOG_SUM]) * factor
    combined[Z_LOG_SUM] = torch.log(masses.sum(0))
    # re-centering on the row's max: each shard's sum gains (its max - the row's max) per unit of mass
    recentering = torch.where(factor > 0, masses * (z_max - row_z_max.unsqueeze(0)), torch.zeros_like(masses))
    for row in _WEIGHTED:
        combined[row] = (gathered[:, row] * factor + recentering).sum(0)
    for row in _SUMMED:
        combined[row] = gathered[:, row].sum(0)
    for row in _FLAGS:
        combined[row] = gathered[:, row].amax(0)
    return combined


def _infinite_where(flag: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """+inf where ``flag`` is set, unless the value is NaN (NaN in an input is never hidden)."""
    return torch.where((flag > 0) & ~torch.isnan(value), torch.inf, value)


def finish_target(sums: torch.Tensor, beta: float, *, one_teacher: bool,
                  with_labels: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(divergence, diagnostics, terms) from the combined sums; the divergence is NaN for JSD (it
    needs :func:`finish_mixture`). Diagnostics are ``[N_DIAGNOSTICS, N]`` in the sums' dtype; those
    that do not apply (the teachers' shift for one teacher, the label's log-probabilities without
    labels) are 0."""
    lse_target = sums[Z_MAX] + sums[Z_LOG_SUM]
    target_mass = torch.exp(sums[Z_LOG_SUM])  # the weighted sums are centered on Z_MAX: lse_target - Z_MAX
    # is Z_LOG_SUM, and no value of z's size enters a difference
    kind = divergence_kind(beta)
    mean_gap = sums[STUDENT_GAP] / sums[STUDENT_MASS]
    if kind == REVERSE_KL:
        mean_gap = _infinite_where(sums[INFINITE_DIVERGENCE], mean_gap)
        divergence = mean_gap + lse_target
    elif kind == FORWARD_KL:
        divergence = _infinite_where(sums[INFINITE_DIVERGENCE], sums[WEIGHTED_TARGET_GAP] / target_mass - sums[Z_LOG_SUM])
    else:
        divergence = torch.full_like(lse_target, torch.nan)
    diagnostics = torch.zeros(N_DIAGNOSTICS, sums.shape[1], dtype=sums.dtype, device=sums.device)
    if not one_teacher:
        diagnostics[0] = _infinite_where(sums[INFINITE_SHIFT], sums[BELIEF_SHIFT])
        diagnostics[1] = sums[CLIPPED_MASS]
    diagnostics[2] = -sums[STUDENT_LOG_STUDENT]
    diagnostics[3] = sums[Z_LOG_SUM] - sums[WEIGHTED_TARGET_LOGIT] / target_mass
    if with_labels:
        diagnostics[4] = sums[STUDENT_TOKEN]
        diagnostics[5] = sums[TARGET_TOKEN_LOGIT] - lse_target
    terms = torch.zeros(N_TERMS, sums.shape[1], dtype=sums.dtype, device=sums.device)
    terms[LSE_TARGET] = lse_target
    terms[TARGET_MEAN_GAP] = mean_gap
    return divergence, diagnostics, terms


def finish_mixture(mixture_sums: torch.Tensor, beta: float, terms: torch.Tensor) -> torch.Tensor:
    """JSD's divergence from the combined ``[2, N]`` mixture sums; records KL(p || m) in ``terms``."""
    kl_target_mixture, kl_student_mixture = mixture_sums[0], mixture_sums[1]
    terms[KL_STUDENT_MIXTURE] = kl_student_mixture
    return beta * kl_target_mixture + (1.0 - beta) * kl_student_mixture


Gather = Callable[[torch.Tensor], torch.Tensor]


def no_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The gather of a single shard: the whole vocabulary is here."""
    return tensor.unsqueeze(0)


def run_stages(stages, student, partial, full, row_temperature, active, grad_scale, grad_out, *, lam, clip, beta,
               with_diagnostics, labels=None, gather: Gather = no_gather) -> RowResult:
    """The per-row contract of :mod:`aropd_kernels.backends` over one shard, from a backend's stage
    functions (``stages``: a module providing the four of this module's docstring).

    Every shard of a row calls it with the same rows, settings and ``gather``; each gets the whole
    row's loss and diagnostics, and writes its own columns of the gradient. Inactive rows get 0.
    """
    views = (student, partial, full, row_temperature, active)
    normalizers = combine_normalizers(gather(stages.shard_normalizers(*views)), row_temperature)
    sums = combine_target_sums(gather(stages.shard_target_sums(
        *views, normalizers, labels, lam=lam, clip=clip, beta=beta, with_diagnostics=with_diagnostics)))
    divergence, diagnostics, terms = finish_target(sums, beta, one_teacher=full is None, with_labels=labels is not None)
    if divergence_kind(beta) == JSD:
        mixture = gather(stages.shard_mixture_sums(*views, normalizers, terms, lam=lam, clip=clip, beta=beta)).sum(0)
        divergence = finish_mixture(mixture, beta, terms)
    if grad_out is not None:
        stages.shard_gradient(*views, normalizers, terms, grad_scale, grad_out, lam=lam, clip=clip, beta=beta)
    loss_dtype = normalizers.dtype  # float32, or float64 for float64 input
    row_loss = torch.where(active, divergence, torch.zeros_like(divergence)).to(loss_dtype)
    if not with_diagnostics:
        return RowResult(row_loss, None)
    diagnostics = torch.where(active, diagnostics, torch.zeros_like(diagnostics)).to(torch.float32)
    return RowResult(row_loss, diagnostics)
