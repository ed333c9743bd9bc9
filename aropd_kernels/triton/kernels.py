"""The anchored-residual divergence as one Triton program per row, its passes fused in that program.

Per row (SPEC §2), every sweep walks the vocabulary in blocks of ``BLOCK_V`` with per-lane running
accumulators, reduced across lanes once at the end of the sweep:

1. ``_log_normalizers``: online log-sum-exp of student, partial and full logits in one read.
2. ``_target_sweep``: the target logits ``z``, their log-normalizer and the row sums the divergence
   needs (reverse KL: sum p (ls - z) and sum p, in float64 when a gradient is written; forward KL: the
   running q-weighted mean of (z - max) - ls), plus the
   diagnostics when ``WITH_DIAGNOSTICS`` (a constexpr: nothing of it is compiled when off).
3. ``_jsd_sweep`` (JSD only): KL(q || m) and KL(p || m), which need the exact lq inside lm.
4. ``_gradient_sweep`` (when ``WRITE_GRAD``): the student gradient, already scaled by the row's
   weight and normalizer over T, stored in the student's dtype, possibly over the student itself.

Nothing of size N×V is written except the gradient. Bytes and transcendentals per element are in
docs/triton.md. Inactive rows write zeros and do nothing else.
"""

import triton
import triton.language as tl

from .tl_utils import (
    LN_2,
    LOG2_E,
    NEG_INF,
    allowed_where_forbidden,
    centered_row_mean,
    infinite_if,
    kl_term,
    lane_weights,
    log2_probs,
    log2_1p,
    online_centered_update,
    online_logsumexp_update,
    target_logit,
    weighted_term,
)

REVERSE_KL = tl.constexpr(0)
FORWARD_KL = tl.constexpr(1)
JSD = tl.constexpr(2)


@triton.jit
def _load_logits(row_ptr, cols, mask, EVICTION: tl.constexpr):
    """Logits of one block upcast to float32 on load; -inf past the row's end."""
    return tl.load(row_ptr + cols, mask=mask, other=NEG_INF, eviction_policy=EVICTION).to(tl.float32)


@triton.jit
def _normalizer(lane_max, lane_sum, scale):
    """(row max of the logits, log2 of the row's sum of exp2((x - max) * scale))."""
    _, row_max, row_sum = lane_weights(lane_max, lane_sum, scale)
    return row_max, tl.log2(row_sum)


@triton.jit
def _log_normalizers(student_row, partial_row, full_row, vocab, scale, BLOCK_V: tl.constexpr):
    """Normalizers (max, log2-sum) of the three rows at ``scale`` = log2(e) / T, in one sweep; the
    loads ask L2 to keep the rows for the sweeps that follow."""
    student_max = tl.full([BLOCK_V], NEG_INF, tl.float32)
    partial_max = tl.full([BLOCK_V], NEG_INF, tl.float32)
    full_max = tl.full([BLOCK_V], NEG_INF, tl.float32)
    student_sum = tl.zeros([BLOCK_V], tl.float32)
    partial_sum = tl.zeros([BLOCK_V], tl.float32)
    full_sum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < vocab
        student = _load_logits(student_row, cols, mask, "evict_last")
        partial = _load_logits(partial_row, cols, mask, "evict_last")
        full = _load_logits(full_row, cols, mask, "evict_last")
        student_max, student_sum, _, _ = online_logsumexp_update(student_max, student_sum, student, scale)
        partial_max, partial_sum, _, _ = online_logsumexp_update(partial_max, partial_sum, partial, scale)
        full_max, full_sum, _, _ = online_logsumexp_update(full_max, full_sum, full, scale)
    return (_normalizer(student_max, student_sum, scale), _normalizer(partial_max, partial_sum, scale),
            _normalizer(full_max, full_sum, scale))


@triton.jit
def _log_probs(row_ptr, normalizer, cols, mask, scale, EVICTION: tl.constexpr):
    """Base-2 log-probabilities of one block of a row, given the row's (max, log2-sum)."""
    return log2_probs(_load_logits(row_ptr, cols, mask, EVICTION), normalizer[0], scale, normalizer[1])


@triton.jit
def _block_log_probs(rows, normalizers, cols, mask, scale, lam, clip, EVICTION: tl.constexpr):
    """Base-2 log-probabilities ls, la, lf of one block and the unnormalized target logits z."""
    log_student = _log_probs(rows[0], normalizers[0], cols, mask, scale, EVICTION)
    log_partial = _log_probs(rows[1], normalizers[1], cols, mask, scale, EVICTION)
    log_full = _log_probs(rows[2], normalizers[2], cols, mask, scale, EVICTION)
    return log_student, log_partial, log_full, target_logit(log_partial, log_full, lam, clip)


@triton.jit
def _target_sweep(rows, normalizers, vocab, scale, lam, clip, DIVERGENCE: tl.constexpr,
                  WITH_DIAGNOSTICS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Normalizer (max, log2-sum) of z; the divergence in base 2 for reverse and forward KL (0 for JSD);
    the four diagnostics (zeros when off); for reverse KL also ``student_gap``, its D less lse_z, which
    the gradient sweep needs.

    Reverse KL: D = student_gap + lse_z with student_gap = sum p (ls - z) in float32, or, when
    ``WRITE_GRAD`` (a gradient is written, in any dtype), sum p (ls - z) / sum p in float64: the gradient
    p ((ls - z) - student_gap) cancels for a confident token, so student_gap must be what the rounded
    p and ls - z say to the last bit (a product of two floats is exact in float64; a float32 sum is
    off by up to half an ulp of D per term), and the mean over p (sum p is 1 only up to rounding) keeps it
    from moving with the student's normalizer.
    Forward KL: D = sum q ((z - max_z) - ls) - log2 sum exp2(z - max_z), the q-weighted sum kept per
    lane, centered on the lane's running max of z, with the same rescaling as the running sum of
    exp2(z); the target entropy likewise from sum q (z - max_z). Centered, neither cancels against
    lse_z where z is far from 0 (a target whose likely tokens have log-probabilities near -1000).
    Infinities (reverse KL, forward KL, belief_shift) are decided from log-probabilities, a per-lane
    flag of :func:`allowed_where_forbidden` reduced after the sweep: the probability that makes the
    sum infinite may underflow to 0 in float32.
    """
    z_max = tl.full([BLOCK_V], NEG_INF, tl.float32)
    z_sum = tl.zeros([BLOCK_V], tl.float32)
    divergence_total = tl.zeros([BLOCK_V], tl.float32)
    exact_gap_total = tl.zeros([BLOCK_V], tl.float64)
    exact_student_mass = tl.zeros([BLOCK_V], tl.float64)
    student_plogp = tl.zeros([BLOCK_V], tl.float32)
    belief_shift = tl.zeros([BLOCK_V], tl.float32)
    clipped_mass = tl.zeros([BLOCK_V], tl.float32)
    target_centered_z = tl.zeros([BLOCK_V], tl.float32)
    infinite_forward = tl.zeros([BLOCK_V], tl.int32)  # forward KL's flag of allowed_where_forbidden
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        log_student, log_partial, log_full, z = _block_log_probs(
            rows, normalizers, cols, cols < vocab, scale, lam, clip, "evict_last")
        previous_max, previous_sum = z_max, z_sum
        z_max, z_sum, decay, grew = online_logsumexp_update(z_max, z_sum, z, 1.0)
        z_centered = tl.where(z == NEG_INF, 0.0, z - z_max)  # q = 0 where z = -inf
        if DIVERGENCE == REVERSE_KL:
            student_prob = tl.exp2(log_student)
            infinite = allowed_where_forbidden(log_student, z)
            if WRITE_GRAD:
                exact_gap_total += kl_term(student_prob.to(tl.float64), (log_student - z).to(tl.float64), infinite)
                exact_student_mass += student_prob.to(tl.float64)
            else:
                divergence_total += kl_term(student_prob, log_student - z, infinite)
        if DIVERGENCE == FORWARD_KL:
            # 0 where ls = -inf too: the flag carries that infinity (the weight may be 0)
            z_minus_student = tl.where(log_student == NEG_INF, 0.0, z_centered - log_student)
            divergence_total = online_centered_update(divergence_total, z_minus_student, previous_max, previous_sum,
                                                      z_max, decay, grew)
            infinite_forward |= allowed_where_forbidden(z, log_student).to(tl.int32)
        if WITH_DIAGNOSTICS:
            student_plogp += weighted_term(tl.exp2(log_student), log_student)
            full_prob = tl.exp2(log_full)
            shift = log_full - log_partial
            belief_shift += kl_term(full_prob, shift, allowed_where_forbidden(log_full, log_partial))
            clipped_mass += tl.where(tl.abs(shift) > clip, full_prob, 0.0)
            target_centered_z = online_centered_update(target_centered_z, z_centered, previous_max, previous_sum,
                                                       z_max, decay, grew)
    lane_weight, z_row_max, z_row_sum = lane_weights(z_max, z_sum, 1.0)
    target_normalizer = (z_row_max, tl.log2(z_row_sum))
    divergence = 0.0
    student_gap = 0.0
    if DIVERGENCE == REVERSE_KL:
        if WRITE_GRAD:
            student_gap = tl.sum(exact_gap_total, 0) / tl.sum(exact_student_mass, 0)
        else:
            student_gap = tl.sum(divergence_total, 0)
        divergence = (student_gap + z_row_max) + target_normalizer[1]  # lse_z, never rounded as a whole
    if DIVERGENCE == FORWARD_KL:
        divergence = centered_row_mean(divergence_total, z_max, z_sum, lane_weight, z_row_max, z_row_sum)
        divergence = infinite_if(divergence - target_normalizer[1], infinite_forward)
    diagnostics = (0.0, 0.0, 0.0, 0.0)
    if WITH_DIAGNOSTICS:
        target_entropy = target_normalizer[1] - centered_row_mean(target_centered_z, z_max, z_sum, lane_weight,
                                                                  z_row_max, z_row_sum)
        diagnostics = (tl.sum(belief_shift, 0) * LN_2, tl.sum(clipped_mass, 0),
                       -tl.sum(student_plogp, 0) * LN_2, target_entropy * LN_2)
    return target_normalizer, divergence, student_gap, diagnostics


@triton.jit
def _student_and_target(rows, normalizers, target_normalizer, cols, mask, scale, lam, clip, EVICTION: tl.constexpr):
    """Base-2 ls and lq of one block, once the target's normalizer is known."""
    log_student, _, _, z = _block_log_probs(rows, normalizers, cols, mask, scale, lam, clip, EVICTION)
    return log_student, log2_probs(z, target_normalizer[0], 1.0, target_normalizer[1])


@triton.jit
def _mixture_gaps(log_student, log_target, beta):
    """(ls - lm, lq - lm) in base 2 for m = beta q + (1 - beta) p, formed in log space.

    Written around the larger of the two mixture terms, so that the gap of the dominant side is a
    constant minus a log1p and never the difference of two nearly equal logs.
    """
    log_student_weight = tl.log2(1.0 - beta)
    log_target_weight = tl.log2(beta)
    student_over_target = log_student - log_target
    dominance = student_over_target + (log_student_weight - log_target_weight)
    correction = log2_1p(tl.exp2(-tl.abs(dominance)))
    student_dominates = dominance >= 0.0
    student_gap = tl.where(student_dominates, -log_student_weight,
                           student_over_target - log_target_weight) - correction
    target_gap = tl.where(student_dominates, -log_student_weight - student_over_target,
                          -log_target_weight) - correction
    return student_gap, target_gap


@triton.jit
def _jsd_sweep(rows, normalizers, target_normalizer, vocab, scale, lam, clip, beta, BLOCK_V: tl.constexpr):
    """Base-2 KL(q || m) and KL(p || m) of the generalized JSD; they need the exact lq inside lm."""
    kl_target_mixture = tl.zeros([BLOCK_V], tl.float32)
    kl_student_mixture = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        log_student, log_target = _student_and_target(rows, normalizers, target_normalizer, cols, cols < vocab,
                                                      scale, lam, clip, "evict_last")
        student_gap, target_gap = _mixture_gaps(log_student, log_target, beta)
        kl_target_mixture += weighted_term(tl.exp2(log_target), target_gap)
        kl_student_mixture += weighted_term(tl.exp2(log_student), student_gap)
    return tl.sum(kl_target_mixture, 0), tl.sum(kl_student_mixture, 0)


@triton.jit
def _split_gap(student_gap):
    """``student_gap`` as float32 (high, low) with high + low = student_gap to float64's precision;
    low is 0 for a float32 gap, and for an infinite one (where high - high would make it NaN)."""
    high = student_gap.to(tl.float32)
    low = (student_gap - high.to(student_gap.dtype)).to(tl.float32)
    return high, tl.where(tl.abs(high) < float("inf"), low, 0.0)


@triton.jit
def _gradient_sweep(rows, normalizers, target_normalizer, grad_row, vocab, scale, student_gap, kl_student_mixture,
                    lam, clip, beta, grad_coefficient, DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr):
    """dD/ds times ``grad_coefficient`` (row scale / T), in the gradient's dtype (SPEC §1); base-2
    ``student_gap`` (reverse KL, see :func:`_target_sweep`) and ``kl_student_mixture``.

    Reverse KL: p ((ls - lq) - D) = p ((ls - z) - student_gap), lse_z cancelling exactly; ls - z is
    recomputed exactly as the target sweep summed it, and student_gap subtracted as high, then low:
    where (ls - z) - high cancels (the confident token) that difference is exact and low is kept.
    Each block is read before it is written, so ``grad_row`` may alias the student row (inplace_grad).
    """
    gap_high, gap_low = 0.0, 0.0
    if DIVERGENCE == REVERSE_KL:
        gap_high, gap_low = _split_gap(student_gap)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < vocab
        if DIVERGENCE == REVERSE_KL:
            log_student, _, _, z = _block_log_probs(rows, normalizers, cols, mask, scale, lam, clip, "evict_first")
            grad = weighted_term(tl.exp2(log_student), ((log_student - z) - gap_high) - gap_low) * (
                grad_coefficient * LN_2)
        else:
            log_student, log_target = _student_and_target(rows, normalizers, target_normalizer, cols, mask, scale,
                                                          lam, clip, "evict_first")
            student_prob = tl.exp2(log_student)
        if DIVERGENCE == FORWARD_KL:
            grad = (student_prob - tl.exp2(log_target)) * grad_coefficient
        if DIVERGENCE == JSD:
            student_mixture_gap, _ = _mixture_gaps(log_student, log_target, beta)
            grad = weighted_term(student_prob, student_mixture_gap - kl_student_mixture) * (
                grad_coefficient * (1.0 - beta) * LN_2)
        tl.store(grad_row + cols, grad.to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _zero_row(grad_row, vocab, BLOCK_V: tl.constexpr):
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(grad_row + cols, tl.zeros([BLOCK_V], grad_row.dtype.element_ty), mask=cols < vocab)


@triton.jit
def _store_diagnostics(diagnostics_ptr, n_rows, row, values):
    for k in tl.static_range(4):
        tl.store(diagnostics_ptr + k * n_rows + row, values[k])


@triton.jit
def anchored_residual_rows_kernel(
    student_ptr, partial_ptr, full_ptr, grad_ptr,
    row_temperature_ptr, active_ptr, grad_scale_ptr, row_loss_ptr, diagnostics_ptr,
    n_rows, rows_per_batch, vocab,
    student_stride_b, student_stride_t, partial_stride_b, partial_stride_t,
    full_stride_b, full_stride_t, grad_stride_b, grad_stride_t,
    lam, clip, beta,
    DIVERGENCE: tl.constexpr, WITH_DIAGNOSTICS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row of the per-row contract (aropd_kernels/backends.py); ``clip`` is in base 2;
    with ``WRITE_GRAD`` reverse KL is summed in float64 (see _target_sweep).

    Writes ``row_loss[row]`` = D (nats), ``diagnostics[k, row]`` when ``WITH_DIAGNOSTICS``, and the
    scaled gradient row when ``WRITE_GRAD``. Row offsets are 64-bit so that N·V >= 2^31 works.
    """
    row = tl.program_id(0).to(tl.int64)
    batch = row // rows_per_batch
    position = row % rows_per_batch
    grad_row = grad_ptr + batch * grad_stride_b + position * grad_stride_t
    if tl.load(active_ptr + row):
        rows = (student_ptr + batch * student_stride_b + position * student_stride_t,
                partial_ptr + batch * partial_stride_b + position * partial_stride_t,
                full_ptr + batch * full_stride_b + position * full_stride_t)
        temperature = tl.load(row_temperature_ptr + row)
        scale = (1.0 / temperature) * LOG2_E
        normalizers = _log_normalizers(rows[0], rows[1], rows[2], vocab, scale, BLOCK_V)
        target_normalizer, divergence, student_gap, diagnostics = _target_sweep(
            rows, normalizers, vocab, scale, lam, clip, DIVERGENCE, WITH_DIAGNOSTICS, WRITE_GRAD, BLOCK_V)
        kl_student_mixture = 0.0
        if DIVERGENCE == JSD:
            kl_target_mixture, kl_student_mixture = _jsd_sweep(
                rows, normalizers, target_normalizer, vocab, scale, lam, clip, beta, BLOCK_V)
            divergence = beta * kl_target_mixture + (1.0 - beta) * kl_student_mixture
        tl.store(row_loss_ptr + row, divergence * LN_2)
        if WITH_DIAGNOSTICS:
            _store_diagnostics(diagnostics_ptr, n_rows, row, diagnostics)
        if WRITE_GRAD:
            grad_coefficient = tl.load(grad_scale_ptr + row) / temperature
            _gradient_sweep(rows, normalizers, target_normalizer, grad_row, vocab, scale, student_gap,
                            kl_student_mixture, lam, clip, beta, grad_coefficient, DIVERGENCE, BLOCK_V)
    else:
        tl.store(row_loss_ptr + row, 0.0)
        if WITH_DIAGNOSTICS:
            _store_diagnostics(diagnostics_ptr, n_rows, row, (0.0, 0.0, 0.0, 0.0))
        if WRITE_GRAD:
            _zero_row(grad_row, vocab, BLOCK_V)
