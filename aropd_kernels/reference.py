"""Pure-torch reference of SPEC §1: the executable specification.

It materializes every N×V intermediate, so it is for correctness tests, float64 checks and small
inputs, not for training at scale. Every other backend is held against it and against the float64
gold of the tests. It implements the per-row contract of :mod:`aropd_kernels.backends`.
"""

from __future__ import annotations

import math

import torch

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
    log_partial = _log_softmax_at(partial_teacher_logits.to(dtype), inv_temperature)
    log_full = _log_softmax_at(full_teacher_logits.to(dtype), inv_temperature)
    target = log_partial + _scaled_residual(log_partial, log_full, lam, clip)
    return torch.log_softmax(target, dim=-1)


def _inverse_temperature(temperature, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | float:
    if isinstance(temperature, torch.Tensor):
        return (1.0 / temperature.to(device=like.device, dtype=dtype)).unsqueeze(-1)
    return 1.0 / float(temperature)


def _infinite_where(total: torch.Tensor, log_allowing: torch.Tensor, log_forbidding: torch.Tensor) -> torch.Tensor:
    """+inf on rows where some token is allowed by one distribution (log-probability > -inf) and
    forbidden by the other (-inf), so that KL(allowing || forbidding) is +inf in exact arithmetic
    however far the allowing probability underflows; NaN rows stay NaN (docs/math.md)."""
    infinite = ((log_allowing > NEG_INF) & (log_forbidding == NEG_INF)).any(-1) & ~total.isnan()
    return torch.where(infinite, torch.full_like(total, math.inf), total)


def _log_softmax_at(logits: torch.Tensor, inv_temperature) -> torch.Tensor:
    """log_softmax(logits / T) with the row's max subtracted before the scaling: (x - max) / T is
    rounded relative to x - max, where x / T would be rounded at its own ulp (2e-4 at |x / T| = 4000,
    logits of 200 at T = 0.05), which lands in every log-probability. Rows that are all -inf (max
    -inf) and rows with +inf or NaN stay NaN, as log_softmax makes them."""
    row_max = logits.amax(-1, keepdim=True)
    shift = torch.where(row_max == NEG_INF, torch.zeros_like(row_max), row_max)
    return torch.log_softmax((logits - shift) * inv_temperature, dim=-1)


def _exact_mean(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per-row ``sum(weight * value) / sum(weight)`` in float64 from the (float32) terms as given.

    Reverse KL's gradient p ((ls - lq) - D) cancels for a confident token (p near 1, ls - lq close to
    D): D must be what the rounded p and ls - lq say, to the last bit of the float32 they are in, and
    the mean over p (sum p is 1 only up to rounding) keeps it from moving with the student's
    normalizer. A float32 sum is off by up to half an ulp of D per term (docs/math.md, "How D is rounded
    for the reverse-KL gradient").
    """
    weight64 = weight.double()
    return _xlogy_where(weight64, value.double()).sum(-1) / weight64.sum(-1)


def _divergence_and_score(log_student, log_target, beta):
    """Per-row divergence D and its gradient w.r.t. the student's log-softmax input, times T.

    Returns (D, dD/d(s/T)); the caller divides by T. See docs/math.md for the three formulas.
    """
    p = log_student.exp()
    q = log_target.exp()
    if beta == 1.0:  # reverse KL(p || q)
        gap = log_student - log_target
        divergence = _infinite_where(_exact_mean(p, gap), log_student, log_target)
        high = divergence.to(gap.dtype)
        low = torch.where(high.isfinite(), (divergence - high.double()).to(gap.dtype), 0.0)
        score = _xlogy_where(p, (gap - high.unsqueeze(-1)) - low.unsqueeze(-1))
        divergence = divergence.to(gap.dtype)
    elif beta == 0.0:  # forward KL(q || p)
        divergence = _xlogy_where(q, log_target - log_student).sum(-1)
        divergence = _infinite_where(divergence, log_target, log_student)
        score = p - q
    else:  # generalized JSD with mixture m = beta q + (1 - beta) p, formed in log space
        log_mixture = torch.logaddexp(math.log(beta) + log_target, math.log1p(-beta) + log_student)
        kl_target_mixture = _xlogy_where(q, log_target - log_mixture).sum(-1)
        kl_student_mixture = _xlogy_where(p, log_student - log_mixture).sum(-1)
        divergence = beta * kl_target_mixture + (1 - beta) * kl_student_mixture
        score = (1 - beta) * _xlogy_where(p, log_student - log_mixture - kl_student_mixture.unsqueeze(-1))
    return divergence, score


def _diagnostics(log_student, log_partial, log_full, log_target, clip) -> torch.Tensor:
    """[4, N]: belief_shift, clipped_mass, student_entropy, target_entropy (SPEC §3)."""
    q_full = log_full.exp()
    belief_shift = _infinite_where(_xlogy_where(q_full, log_full - log_partial).sum(-1), log_full, log_partial)
    clipped = (log_full - log_partial).abs() > clip
    clipped_mass = torch.where(clipped, q_full, torch.zeros_like(q_full)).sum(-1)
    student_entropy = -_xlogy_where(log_student.exp(), log_student).sum(-1)
    target_entropy = -_xlogy_where(log_target.exp(), log_target).sum(-1)
    return torch.stack([belief_shift, clipped_mass, student_entropy, target_entropy])


def compute_rows(
    student: torch.Tensor,
    partial: torch.Tensor,
    full: torch.Tensor,
    row_temperature: torch.Tensor,
    active: torch.Tensor,
    grad_scale: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    *,
    lam: float,
    clip: float,
    beta: float,
    with_diagnostics: bool,
) -> RowResult:
    """The per-row contract of :func:`aropd_kernels.backends.compute_rows`, in plain torch."""
    dtype = _compute_dtype(student, partial, full)
    inv_temperature = (1.0 / row_temperature.to(dtype)).unsqueeze(-1)
    rows = active.nonzero().squeeze(-1)  # skipped rows do no work

    vocab = student.shape[-1]

    def log_probs(x):
        rows_of_x = x.reshape(-1, vocab).index_select(0, rows).to(dtype)
        return _log_softmax_at(rows_of_x, inv_temperature.index_select(0, rows))

    log_student = log_probs(student)
    log_partial = log_probs(partial)
    log_full = log_probs(full)
    log_target = torch.log_softmax(log_partial + _scaled_residual(log_partial, log_full, lam, clip), dim=-1)
    divergence, score = _divergence_and_score(log_student, log_target, beta)

    n_rows = row_temperature.shape[0]
    row_loss = torch.zeros(n_rows, dtype=dtype, device=student.device)
    row_loss.index_copy_(0, rows, divergence)
    diagnostics = None
    if with_diagnostics:
        diagnostics = torch.zeros(4, n_rows, dtype=dtype, device=student.device)
        diagnostics.index_copy_(1, rows, _diagnostics(log_student, log_partial, log_full, log_target, clip))
        diagnostics = diagnostics.to(torch.float32)  # float32 whatever the compute dtype (SPEC §3)
    if grad_scale is not None:
        scale = (grad_scale.to(dtype).index_select(0, rows) * inv_temperature.squeeze(-1).index_select(0, rows))
        row_grad = (score * scale.unsqueeze(-1)).to(grad_out.dtype)
        grad_rows = torch.zeros(n_rows, vocab, dtype=grad_out.dtype, device=grad_out.device)
        grad_rows.index_copy_(0, rows, row_grad)
        grad_out.copy_(grad_rows.view(grad_out.shape))
    return RowResult(row_loss, diagnostics)
