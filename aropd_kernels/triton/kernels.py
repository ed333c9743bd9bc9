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

from .. import backends, shards

from .tl_utils import (
    LN_2,
    LOG2_E,
    NEG_INF,
    allowed_where_forbidden,
    centered_row_total,
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

N_DIAGNOSTICS = tl.constexpr(backends.N_DIAGNOSTICS)
# rows of the shard stages' tensors (aropd_kernels/shards.py)
MAX, LOG_SUM = tl.constexpr(shards.MAX), tl.constexpr(shards.LOG_SUM)
Z_MAX, Z_LOG_SUM = tl.constexpr(shards.Z_MAX), tl.constexpr(shards.Z_LOG_SUM)
WEIGHTED_TARGET_GAP = tl.constexpr(shards.WEIGHTED_TARGET_GAP)
WEIGHTED_TARGET_LOGIT = tl.constexpr(shards.WEIGHTED_TARGET_LOGIT)
STUDENT_GAP, STUDENT_MASS = tl.constexpr(shards.STUDENT_GAP), tl.constexpr(shards.STUDENT_MASS)
BELIEF_SHIFT, CLIPPED_MASS = tl.constexpr(shards.BELIEF_SHIFT), tl.constexpr(shards.CLIPPED_MASS)
STUDENT_LOG_STUDENT = tl.constexpr(shards.STUDENT_LOG_STUDENT)
STUDENT_TOKEN, TARGET_TOKEN_LOGIT = tl.constexpr(shards.STUDENT_TOKEN), tl.constexpr(shards.TARGET_TOKEN_LOGIT)
INFINITE_DIVERGENCE, INFINITE_SHIFT = tl.constexpr(shards.INFINITE_DIVERGENCE), tl.constexpr(shards.INFINITE_SHIFT)
LSE_TARGET, TARGET_MEAN_GAP = tl.constexpr(shards.LSE_TARGET), tl.constexpr(shards.TARGET_MEAN_GAP)
KL_STUDENT_MIXTURE = tl.constexpr(shards.KL_STUDENT_MIXTURE)

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
def _log_normalizers(student_row, partial_row, full_row, vocab, scale, ONE_TEACHER: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    """Normalizers (max, log2-sum) of the three rows at ``scale`` = log2(e) / T, in one sweep; the
    loads ask L2 to keep the rows for the sweeps that follow. With ``ONE_TEACHER`` the full row is
    never read and its normalizer is the teacher's (unused)."""
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
        student_max, student_sum, _, _ = online_logsumexp_update(student_max, student_sum, student, scale)
        partial_max, partial_sum, _, _ = online_logsumexp_update(partial_max, partial_sum, partial, scale)
        if not ONE_TEACHER:
            full = _load_logits(full_row, cols, mask, "evict_last")
            full_max, full_sum, _, _ = online_logsumexp_update(full_max, full_sum, full, scale)
    partial_normalizer = _normalizer(partial_max, partial_sum, scale)
    full_normalizer = partial_normalizer
    if not ONE_TEACHER:
        full_normalizer = _normalizer(full_max, full_sum, scale)
    return _normalizer(student_max, student_sum, scale), partial_normalizer, full_normalizer


@triton.jit
def _log_probs(row_ptr, normalizer, cols, mask, scale, EVICTION: tl.constexpr):
    """Base-2 log-probabilities of one block of a row, given the row's (max, log2-sum)."""
    return log2_probs(_load_logits(row_ptr, cols, mask, EVICTION), normalizer[0], scale, normalizer[1])


@triton.jit
def _block_log_probs(rows, normalizers, cols, mask, scale, lam, clip, EVICTION: tl.constexpr,
                     ONE_TEACHER: tl.constexpr):
    """Base-2 log-probabilities ls, la, lf of one block and the unnormalized target logits z; with
    ``ONE_TEACHER`` z is the teacher's la (already normalized) and lf is la (the full row is not read)."""
    log_student = _log_probs(rows[0], normalizers[0], cols, mask, scale, EVICTION)
    log_partial = _log_probs(rows[1], normalizers[1], cols, mask, scale, EVICTION)
    if ONE_TEACHER:
        log_full = log_partial
        z = log_partial
    else:
        log_full = _log_probs(rows[2], normalizers[2], cols, mask, scale, EVICTION)
        z = target_logit(log_partial, log_full, lam, clip)
    return log_student, log_partial, log_full, z


@triton.jit
def _label_log_probs(rows, normalizers, label, vocab, scale, lam, clip, ONE_TEACHER: tl.constexpr):
    """(label in [0, vocab), base-2 ls at the label, z at the label), from scalar loads of the label's
    logits: O(1) per row, and read before any gradient is written over the student (inplace_grad).
    Both values are 0 where the label is outside the row (ignored, or in another vocabulary shard)."""
    inside = (label >= 0) & (label < vocab)
    column = tl.where(inside, label, 0)
    log_student, _, _, z = _block_log_probs(rows, normalizers, column, inside, scale, lam, clip, "", ONE_TEACHER)
    return inside, tl.where(inside, log_student, 0.0), tl.where(inside, z, 0.0)


@triton.jit
def _target_sweep(rows, normalizers, vocab, scale, lam, clip, DIVERGENCE: tl.constexpr,
                  WITH_DIAGNOSTICS: tl.constexpr, EXACT_GAP: tl.constexpr, ONE_TEACHER: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """The row sums over the target logits z, in base 2, reduced across lanes:

    ``(z_max, z_sum, gap, student_mass, forward_gap, infinite_forward, target_centered, student_plogp,
    belief_shift, clipped_mass)`` with ``z_sum`` = sum exp2(z - z_max) and, for q's weights
    w = exp2(z - z_max), ``forward_gap`` = sum w ((z - z_max) - ls) and ``target_centered`` =
    sum w (z - z_max); ``gap`` = sum p (ls - z) and ``student_mass`` = sum p (reverse KL; both in
    float64 when ``EXACT_GAP``, else the mass is not summed). Sums a divergence or the diagnostics do
    not need are 0 and not compiled.

    Reverse KL: D = sum p (ls - z) / sum p + lse_z. When a gradient is written the sums run in
    float64 (``EXACT_GAP``): the gradient p ((ls - z) - student_gap) cancels for a confident token, so
    the gap must be what the rounded p and ls - z say to the last bit (a product of two floats is exact
    in float64; a float32 sum is off by up to half an ulp of D per term), and the mean over p (sum p is
    1 only up to rounding) keeps it from moving with the student's normalizer.
    Forward KL: D = sum q ((z - max_z) - ls) - log2 sum exp2(z - max_z), the q-weighted sum kept per
    lane, centered on the lane's running max of z, with the same rescaling as the running sum of
    exp2(z); the target entropy likewise from sum q (z - max_z). Centered, neither cancels against
    lse_z where z is far from 0 (a target whose likely tokens have log-probabilities near -1000).
    Infinities (reverse KL, forward KL, belief_shift) are decided from log-probabilities
    (:func:`allowed_where_forbidden`): the probability that makes the sum infinite may underflow to 0
    in float32. Reverse KL and belief_shift are plain sums whose term is +inf there; forward KL's sum
    is rescaled, so its infinity is a per-lane int32 flag, reduced after the sweep.
    """
    z_max = tl.full([BLOCK_V], NEG_INF, tl.float32)
    z_sum = tl.zeros([BLOCK_V], tl.float32)
    gap_total = tl.zeros([BLOCK_V], tl.float32)
    forward_gap_total = tl.zeros([BLOCK_V], tl.float32)
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
            rows, normalizers, cols, cols < vocab, scale, lam, clip, "evict_last", ONE_TEACHER)
        previous_max, previous_sum = z_max, z_sum
        z_max, z_sum, decay, grew = online_logsumexp_update(z_max, z_sum, z, 1.0)
        z_centered = tl.where(z == NEG_INF, 0.0, z - z_max)  # q = 0 where z = -inf
        if DIVERGENCE == REVERSE_KL:
            student_prob = tl.exp2(log_student)
            infinite = allowed_where_forbidden(log_student, z)
            if EXACT_GAP:
                exact_gap_total += kl_term(student_prob.to(tl.float64), (log_student - z).to(tl.float64), infinite)
                exact_student_mass += student_prob.to(tl.float64)
            else:
                gap_total += kl_term(student_prob, log_student - z, infinite)
        if DIVERGENCE == FORWARD_KL:
            # 0 where ls = -inf too: the flag carries that infinity (the weight may be 0)
            z_minus_student = tl.where(log_student == NEG_INF, 0.0, z_centered - log_student)
            forward_gap_total = online_centered_update(forward_gap_total, z_minus_student, previous_max,
                                                       previous_sum, z_max, decay, grew)
            infinite_forward |= allowed_where_forbidden(z, log_student).to(tl.int32)
        if WITH_DIAGNOSTICS:
            student_plogp += weighted_term(tl.exp2(log_student), log_student)
            if not ONE_TEACHER:
                full_prob = tl.exp2(log_full)
                shift = log_full - log_partial
                belief_shift += kl_term(full_prob, shift, allowed_where_forbidden(log_full, log_partial))
                clipped_mass += tl.where(tl.abs(shift) > clip, full_prob, 0.0)
            target_centered_z = online_centered_update(target_centered_z, z_centered, previous_max, previous_sum,
                                                       z_max, decay, grew)
    lane_weight, z_row_max, z_row_sum = lane_weights(z_max, z_sum, 1.0)
    if EXACT_GAP:
        gap = tl.sum(exact_gap_total, 0)
        student_mass = tl.sum(exact_student_mass, 0)
    else:
        gap = tl.sum(gap_total, 0)
        student_mass = 0.0
    return (z_row_max, z_row_sum, gap, student_mass,
            centered_row_total(forward_gap_total, z_max, z_sum, lane_weight, z_row_max), tl.max(infinite_forward, 0),
            centered_row_total(target_centered_z, z_max, z_sum, lane_weight, z_row_max),
            tl.sum(student_plogp, 0), tl.sum(belief_shift, 0), tl.sum(clipped_mass, 0))


@triton.jit
def _finish_target(sums, DIVERGENCE: tl.constexpr, WITH_DIAGNOSTICS: tl.constexpr, EXACT_GAP: tl.constexpr):
    """From :func:`_target_sweep`'s sums of a whole row: the target's normalizer (max, log2-sum) of z;
    the divergence in base 2 for reverse and forward KL (0 for JSD); for reverse KL ``student_gap``,
    its D less lse_z, which the gradient sweep needs; the four diagnostics in nats (0 when off)."""
    z_row_max, z_row_sum, gap, student_mass, forward_gap, infinite_forward, target_centered, student_plogp, \
        belief_shift, clipped_mass = sums
    target_normalizer = (z_row_max, tl.log2(z_row_sum))
    divergence = 0.0
    student_gap = 0.0
    if DIVERGENCE == REVERSE_KL:
        if EXACT_GAP:
            student_gap = gap / student_mass
        else:
            student_gap = gap
        divergence = (student_gap + z_row_max) + target_normalizer[1]  # lse_z, never rounded as a whole
    if DIVERGENCE == FORWARD_KL:
        divergence = infinite_if(forward_gap / z_row_sum - target_normalizer[1], infinite_forward)
    diagnostics = (0.0, 0.0, 0.0, 0.0)
    if WITH_DIAGNOSTICS:
        target_entropy = target_normalizer[1] - target_centered / z_row_sum
        diagnostics = (belief_shift * LN_2, clipped_mass, -student_plogp * LN_2, target_entropy * LN_2)
    return target_normalizer, divergence, student_gap, diagnostics


@triton.jit
def _student_and_target(rows, normalizers, target_normalizer, cols, mask, scale, lam, clip, EVICTION: tl.constexpr,
                        ONE_TEACHER: tl.constexpr):
    """Base-2 ls and lq of one block, once the target's normalizer is known: lq = (z - first) - second
    for the normalizer's pair (the row's max of z and the log2-sum, or a log-sum-exp split in two)."""
    log_student, _, _, z = _block_log_probs(rows, normalizers, cols, mask, scale, lam, clip, EVICTION, ONE_TEACHER)
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
def _jsd_sweep(rows, normalizers, target_normalizer, vocab, scale, lam, clip, beta, ONE_TEACHER: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """Base-2 KL(q || m) and KL(p || m) of the generalized JSD; they need the exact lq inside lm."""
    kl_target_mixture = tl.zeros([BLOCK_V], tl.float32)
    kl_student_mixture = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        log_student, log_target = _student_and_target(rows, normalizers, target_normalizer, cols, cols < vocab,
                                                      scale, lam, clip, "evict_last", ONE_TEACHER)
        student_gap, target_gap = _mixture_gaps(log_student, log_target, beta)
        kl_target_mixture += weighted_term(tl.exp2(log_target), target_gap)
        kl_student_mixture += weighted_term(tl.exp2(log_student), student_gap)
    return tl.sum(kl_target_mixture, 0), tl.sum(kl_student_mixture, 0)


@triton.jit
def _float32_pair(value):
    """``value`` as float32 (high, low) with high + low = value to float64's precision; low is 0 for a
    float32 value, and for an infinite one (where high - high would make it NaN)."""
    high = value.to(tl.float32)
    low = (value - high.to(value.dtype)).to(tl.float32)
    return high, tl.where(tl.abs(high) < float("inf"), low, 0.0)


@triton.jit
def _gradient_sweep(rows, normalizers, target_normalizer, grad_row, vocab, scale, student_gap, kl_student_mixture,
                    lam, clip, beta, grad_coefficient, DIVERGENCE: tl.constexpr, ONE_TEACHER: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    """dD/ds times ``grad_coefficient`` (row scale / T), in the gradient's dtype (SPEC §1); base-2
    ``student_gap`` (reverse KL, see :func:`_target_sweep`) and ``kl_student_mixture``.

    Reverse KL: p ((ls - lq) - D) = p ((ls - z) - student_gap), lse_z cancelling exactly; ls - z is
    recomputed exactly as the target sweep summed it, and student_gap subtracted as high, then low:
    where (ls - z) - high cancels (the confident token) that difference is exact and low is kept.
    Each block is read before it is written, so ``grad_row`` may alias the student row (inplace_grad).
    """
    gap_high, gap_low = 0.0, 0.0
    if DIVERGENCE == REVERSE_KL:
        gap_high, gap_low = _float32_pair(student_gap)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < vocab
        if DIVERGENCE == REVERSE_KL:
            log_student, _, _, z = _block_log_probs(rows, normalizers, cols, mask, scale, lam, clip, "evict_first",
                                                    ONE_TEACHER)
            grad = weighted_term(tl.exp2(log_student), ((log_student - z) - gap_high) - gap_low) * (
                grad_coefficient * LN_2)
        else:
            log_student, log_target = _student_and_target(rows, normalizers, target_normalizer, cols, mask, scale,
                                                          lam, clip, "evict_first", ONE_TEACHER)
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
def _store_rows(ptr, n_rows, row, values, COUNT: tl.constexpr):
    """``values[k]`` into entry ``[k, row]`` of a ``[COUNT, n_rows]`` tensor, in its dtype."""
    for k in tl.static_range(COUNT):
        tl.store(ptr + k * n_rows + row, values[k])


@triton.jit
def _store_zeros(ptr, n_rows, row, COUNT: tl.constexpr):
    for k in tl.static_range(COUNT):
        tl.store(ptr + k * n_rows + row, 0.0)


@triton.jit
def _input_rows(student_ptr, partial_ptr, full_ptr, batch, position, student_stride_b, student_stride_t,
                partial_stride_b, partial_stride_t, full_stride_b, full_stride_t):
    """Pointers to the row's student, partial and full logits (64-bit offsets: N·V >= 2^31 works)."""
    return (student_ptr + batch * student_stride_b + position * student_stride_t,
            partial_ptr + batch * partial_stride_b + position * partial_stride_t,
            full_ptr + batch * full_stride_b + position * full_stride_t)


@triton.jit
def _scale(row_temperature_ptr, row):
    """(T, log2(e) / T) of the row."""
    temperature = tl.load(row_temperature_ptr + row)
    return temperature, (1.0 / temperature) * LOG2_E


@triton.jit
def anchored_residual_rows_kernel(
    student_ptr, partial_ptr, full_ptr, grad_ptr,
    row_temperature_ptr, active_ptr, grad_scale_ptr, labels_ptr, row_loss_ptr, diagnostics_ptr,
    n_rows, rows_per_batch, vocab,
    student_stride_b, student_stride_t, partial_stride_b, partial_stride_t,
    full_stride_b, full_stride_t, grad_stride_b, grad_stride_t,
    lam, clip, beta,
    DIVERGENCE: tl.constexpr, WITH_DIAGNOSTICS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ONE_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row of the per-row contract (aropd_kernels/backends.py), every sweep fused;
    ``clip`` is in base 2; with ``WRITE_GRAD`` reverse KL is summed in float64 (see _target_sweep).
    With ``ONE_TEACHER`` the target is softmax(partial / T) and ``full_ptr`` is never read.

    Writes ``row_loss[row]`` = D (nats), ``diagnostics[k, row]`` (the six of the contract; the labels'
    log-probabilities from ``labels[row]``, 0 where it is outside [0, V)) when ``WITH_DIAGNOSTICS``,
    and the scaled gradient row when ``WRITE_GRAD``.
    """
    row = tl.program_id(0).to(tl.int64)
    batch = row // rows_per_batch
    position = row % rows_per_batch
    grad_row = grad_ptr + batch * grad_stride_b + position * grad_stride_t
    if tl.load(active_ptr + row):
        rows = _input_rows(student_ptr, partial_ptr, full_ptr, batch, position, student_stride_b, student_stride_t,
                           partial_stride_b, partial_stride_t, full_stride_b, full_stride_t)
        temperature, scale = _scale(row_temperature_ptr, row)
        normalizers = _log_normalizers(rows[0], rows[1], rows[2], vocab, scale, ONE_TEACHER, BLOCK_V)
        if WITH_DIAGNOSTICS:
            label_inside, label_student, label_z = _label_log_probs(
                rows, normalizers, tl.load(labels_ptr + row), vocab, scale, lam, clip, ONE_TEACHER)
        target_normalizer, divergence, student_gap, diagnostics = _finish_target(
            _target_sweep(rows, normalizers, vocab, scale, lam, clip, DIVERGENCE, WITH_DIAGNOSTICS, WRITE_GRAD,
                          ONE_TEACHER, BLOCK_V),
            DIVERGENCE, WITH_DIAGNOSTICS, WRITE_GRAD)
        kl_student_mixture = 0.0
        if DIVERGENCE == JSD:
            kl_target_mixture, kl_student_mixture = _jsd_sweep(
                rows, normalizers, target_normalizer, vocab, scale, lam, clip, beta, ONE_TEACHER, BLOCK_V)
            divergence = beta * kl_target_mixture + (1.0 - beta) * kl_student_mixture
        tl.store(row_loss_ptr + row, divergence * LN_2)
        if WITH_DIAGNOSTICS:
            label_target = tl.where(label_inside, (label_z - target_normalizer[0]) - target_normalizer[1], 0.0)
            _store_rows(diagnostics_ptr, n_rows, row, (diagnostics[0], diagnostics[1], diagnostics[2], diagnostics[3],
                                                       label_student * LN_2, label_target * LN_2), N_DIAGNOSTICS)
        if WRITE_GRAD:
            grad_coefficient = tl.load(grad_scale_ptr + row) / temperature
            _gradient_sweep(rows, normalizers, target_normalizer, grad_row, vocab, scale, student_gap,
                            kl_student_mixture, lam, clip, beta, grad_coefficient, DIVERGENCE, ONE_TEACHER, BLOCK_V)
    else:
        tl.store(row_loss_ptr + row, 0.0)
        if WITH_DIAGNOSTICS:
            _store_zeros(diagnostics_ptr, n_rows, row, N_DIAGNOSTICS)
        if WRITE_GRAD:
            _zero_row(grad_row, vocab, BLOCK_V)


# --- the shard stages of aropd_kernels/shards.py: the same sweeps, one kernel per stage --------------------


@triton.jit
def _store_normalizer(normalizers_ptr, n_rows, row, INPUT: tl.constexpr, normalizer):
    """Entries ``[INPUT, MAX | LOG_SUM, row]``: the raw max and the natural log-sum of the shards' layout."""
    tl.store(normalizers_ptr + (2 * INPUT + MAX) * n_rows + row, normalizer[0])
    tl.store(normalizers_ptr + (2 * INPUT + LOG_SUM) * n_rows + row, normalizer[1] * LN_2)


@triton.jit
def _load_normalizer(normalizers_ptr, n_rows, row, INPUT: tl.constexpr):
    """(raw max, log2-sum) of one input from the shards' layout (natural log-sum)."""
    return (tl.load(normalizers_ptr + (2 * INPUT + MAX) * n_rows + row),
            tl.load(normalizers_ptr + (2 * INPUT + LOG_SUM) * n_rows + row) * LOG2_E)


@triton.jit
def _load_normalizers(normalizers_ptr, n_rows, row, ONE_TEACHER: tl.constexpr):
    """The three inputs' (max, log2-sum), as :func:`_log_normalizers` gives them, from the combined
    ``[n_inputs, 2, N]`` normalizers (for one teacher the full one is the teacher's, unused)."""
    student = _load_normalizer(normalizers_ptr, n_rows, row, 0)
    partial = _load_normalizer(normalizers_ptr, n_rows, row, 1)
    full = partial
    if not ONE_TEACHER:
        full = _load_normalizer(normalizers_ptr, n_rows, row, 2)
    return student, partial, full


@triton.jit
def _target_log_normalizer(terms_ptr, n_rows, row):
    """The whole row's lse_z from ``terms`` (base 2) as a float32 (high, low) pair: lq = (z - high) - low
    keeps its precision where z and lse_z are both far from 0."""
    return _float32_pair(tl.load(terms_ptr + LSE_TARGET * n_rows + row))


@triton.jit
def _centered_sum(centered_total, z_sum):
    """A weighted sum as shards.py keeps it, centered on the shard's z_max (w = exp2(z - z_max)), in
    float64; 0 where every z is -inf."""
    return tl.where(z_sum == 0.0, 0.0, centered_total.to(tl.float64))


@triton.jit
def shard_normalizers_kernel(
    student_ptr, partial_ptr, full_ptr, row_temperature_ptr, active_ptr, normalizers_ptr,
    n_rows, rows_per_batch, vocab,
    student_stride_b, student_stride_t, partial_stride_b, partial_stride_t, full_stride_b, full_stride_t,
    ONE_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``shard_normalizers``: sweep 1 of the fused kernel, written as ``[n_inputs, 2, N]`` (0 at skipped rows)."""
    row = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + row):
        rows = _input_rows(student_ptr, partial_ptr, full_ptr, row // rows_per_batch, row % rows_per_batch,
                           student_stride_b, student_stride_t, partial_stride_b, partial_stride_t,
                           full_stride_b, full_stride_t)
        _, scale = _scale(row_temperature_ptr, row)
        normalizers = _log_normalizers(rows[0], rows[1], rows[2], vocab, scale, ONE_TEACHER, BLOCK_V)
        _store_normalizer(normalizers_ptr, n_rows, row, 0, normalizers[0])
        _store_normalizer(normalizers_ptr, n_rows, row, 1, normalizers[1])
        if not ONE_TEACHER:
            _store_normalizer(normalizers_ptr, n_rows, row, 2, normalizers[2])
    else:
        _store_zeros(normalizers_ptr, n_rows, row, 4)
        if not ONE_TEACHER:
            _store_zeros(normalizers_ptr + 4 * n_rows, n_rows, row, 2)


@triton.jit
def shard_target_sums_kernel(
    student_ptr, partial_ptr, full_ptr, row_temperature_ptr, active_ptr, normalizers_ptr, labels_ptr, sums_ptr,
    n_rows, rows_per_batch, vocab,
    student_stride_b, student_stride_t, partial_stride_b, partial_stride_t, full_stride_b, full_stride_t,
    lam, clip,
    DIVERGENCE: tl.constexpr, WITH_DIAGNOSTICS: tl.constexpr, ONE_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``shard_target_sums``: sweep 2 of the fused kernel (reverse KL always in float64) over the shard,
    given the combined normalizers, into the float64 ``[N_TARGET_SUMS, N]`` layout of aropd_kernels/shards.py
    but in base 2 (the launch converts to nats in float64). Writes only the rows that apply: the caller
    passes zeros."""
    row = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + row):
        rows = _input_rows(student_ptr, partial_ptr, full_ptr, row // rows_per_batch, row % rows_per_batch,
                           student_stride_b, student_stride_t, partial_stride_b, partial_stride_t,
                           full_stride_b, full_stride_t)
        _, scale = _scale(row_temperature_ptr, row)
        normalizers = _load_normalizers(normalizers_ptr, n_rows, row, ONE_TEACHER)
        if WITH_DIAGNOSTICS:
            _, label_student, label_z = _label_log_probs(rows, normalizers, tl.load(labels_ptr + row), vocab, scale,
                                                         lam, clip, ONE_TEACHER)
        z_max, z_sum, gap, student_mass, forward_gap, infinite_forward, target_centered, student_plogp, \
            belief_shift, clipped_mass = _target_sweep(rows, normalizers, vocab, scale, lam, clip, DIVERGENCE,
                                                       WITH_DIAGNOSTICS, True, ONE_TEACHER, BLOCK_V)
        tl.store(sums_ptr + Z_MAX * n_rows + row, z_max)
        tl.store(sums_ptr + Z_LOG_SUM * n_rows + row, tl.log2(z_sum))
        if DIVERGENCE == REVERSE_KL:
            tl.store(sums_ptr + STUDENT_GAP * n_rows + row, gap)
            tl.store(sums_ptr + STUDENT_MASS * n_rows + row, student_mass)
            tl.store(sums_ptr + INFINITE_DIVERGENCE * n_rows + row, tl.where(gap == float("inf"), 1.0, 0.0))
        if DIVERGENCE == FORWARD_KL:
            tl.store(sums_ptr + WEIGHTED_TARGET_GAP * n_rows + row, _centered_sum(forward_gap, z_sum))
            tl.store(sums_ptr + INFINITE_DIVERGENCE * n_rows + row, infinite_forward)
        if WITH_DIAGNOSTICS:
            tl.store(sums_ptr + WEIGHTED_TARGET_LOGIT * n_rows + row, _centered_sum(target_centered, z_sum))
            tl.store(sums_ptr + STUDENT_LOG_STUDENT * n_rows + row, student_plogp)
            tl.store(sums_ptr + STUDENT_TOKEN * n_rows + row, label_student)
            tl.store(sums_ptr + TARGET_TOKEN_LOGIT * n_rows + row, label_z)
            if not ONE_TEACHER:
                tl.store(sums_ptr + BELIEF_SHIFT * n_rows + row, belief_shift)
                tl.store(sums_ptr + CLIPPED_MASS * n_rows + row, clipped_mass)
                tl.store(sums_ptr + INFINITE_SHIFT * n_rows + row, tl.where(belief_shift == float("inf"), 1.0, 0.0))


@triton.jit
def shard_mixture_sums_kernel(
    student_ptr, partial_ptr, full_ptr, row_temperature_ptr, active_ptr, normalizers_ptr, terms_ptr, mixture_ptr,
    n_rows, rows_per_batch, vocab,
    student_stride_b, student_stride_t, partial_stride_b, partial_stride_t, full_stride_b, full_stride_t,
    lam, clip, beta,
    ONE_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``shard_mixture_sums``: the JSD sweep over the shard, KL(q || m) and KL(p || m) in base 2 into the
    float64 ``[2, N]`` mixture sums (0 at skipped rows)."""
    row = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + row):
        rows = _input_rows(student_ptr, partial_ptr, full_ptr, row // rows_per_batch, row % rows_per_batch,
                           student_stride_b, student_stride_t, partial_stride_b, partial_stride_t,
                           full_stride_b, full_stride_t)
        _, scale = _scale(row_temperature_ptr, row)
        normalizers = _load_normalizers(normalizers_ptr, n_rows, row, ONE_TEACHER)
        target_normalizer = _target_log_normalizer(terms_ptr, n_rows, row)
        kl_target_mixture, kl_student_mixture = _jsd_sweep(
            rows, normalizers, target_normalizer, vocab, scale, lam, clip, beta, ONE_TEACHER, BLOCK_V)
        _store_rows(mixture_ptr, n_rows, row, (kl_target_mixture, kl_student_mixture), 2)
    else:
        _store_zeros(mixture_ptr, n_rows, row, 2)


@triton.jit
def shard_gradient_kernel(
    student_ptr, partial_ptr, full_ptr, grad_ptr,
    row_temperature_ptr, active_ptr, grad_scale_ptr, normalizers_ptr, terms_ptr,
    n_rows, rows_per_batch, vocab,
    student_stride_b, student_stride_t, partial_stride_b, partial_stride_t,
    full_stride_b, full_stride_t, grad_stride_b, grad_stride_t,
    lam, clip, beta,
    DIVERGENCE: tl.constexpr, ONE_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``shard_gradient``: the gradient sweep over the shard's columns, given the combined normalizers and
    the whole row's ``terms`` (float64, in base 2); zeros at skipped rows. ``grad_row`` may alias the student."""
    row = tl.program_id(0).to(tl.int64)
    batch = row // rows_per_batch
    position = row % rows_per_batch
    grad_row = grad_ptr + batch * grad_stride_b + position * grad_stride_t
    if tl.load(active_ptr + row):
        rows = _input_rows(student_ptr, partial_ptr, full_ptr, batch, position, student_stride_b, student_stride_t,
                           partial_stride_b, partial_stride_t, full_stride_b, full_stride_t)
        temperature, scale = _scale(row_temperature_ptr, row)
        normalizers = _load_normalizers(normalizers_ptr, n_rows, row, ONE_TEACHER)
        student_gap = 0.0
        target_normalizer = (0.0, 0.0)
        kl_student_mixture = 0.0
        if DIVERGENCE == REVERSE_KL:
            student_gap = tl.load(terms_ptr + TARGET_MEAN_GAP * n_rows + row)
        else:
            target_normalizer = _target_log_normalizer(terms_ptr, n_rows, row)
        if DIVERGENCE == JSD:
            kl_student_mixture = tl.load(terms_ptr + KL_STUDENT_MIXTURE * n_rows + row).to(tl.float32)
        grad_coefficient = tl.load(grad_scale_ptr + row) / temperature
        _gradient_sweep(rows, normalizers, target_normalizer, grad_row, vocab, scale, student_gap,
                        kl_student_mixture, lam, clip, beta, grad_coefficient, DIVERGENCE, ONE_TEACHER, BLOCK_V)
    else:
        _zero_row(grad_row, vocab, BLOCK_V)
