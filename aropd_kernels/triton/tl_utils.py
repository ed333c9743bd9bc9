"""Triton helpers shared by the anchored-residual kernels: online log-sum-exp in base 2, the target logit.

Every log-domain quantity inside the kernels is in base 2 (``log2 p``), so each exponential is one
``exp2`` and each logarithm one ``log2``; the kernel multiplies row sums by ln 2 once at the end.
"""

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))
ALL_NAN = tl.constexpr(tl.PropagateNan.ALL)  # NaN in an input must reach the loss, never be dropped
LOG2_E = tl.constexpr(1.4426950408889634)
LN_2 = tl.constexpr(0.6931471805599453)
# Constants go on the right of a tensor operand: the interpreter evaluates ``constexpr * tensor``
# as a constexpr holding a tensor, which tl.store then rejects.


@triton.jit
def online_logsumexp_update(running_max, running_sum, x, scale):
    """Fold ``x`` into per-lane running ``(max of x, sum of exp2((x - max) * scale))``, one exp2 each.

    The max is kept in the units of ``x`` (raw logits for the inputs, so that ``x - max`` is exact
    and only the small difference is scaled; see :func:`log2_probs`). Returns the new pair and
    ``(decay, grew)``: where ``grew`` the old sum was rescaled by ``decay`` and ``x`` enters with
    weight 1, elsewhere ``x`` enters with weight ``decay``. Callers keeping a running exp2-weighted
    sum of another value reuse them instead of exponentiating again (:func:`online_centered_update`).
    """
    new_max = tl.maximum(running_max, x, propagate_nan=ALL_NAN)
    smaller = tl.minimum(running_max, x, propagate_nan=ALL_NAN)
    # A lane that has seen only -inf holds no mass: exp2(-inf - -inf) would be NaN.
    decay = tl.where(new_max == NEG_INF, 0.0, tl.exp2((smaller - new_max) * scale))
    grew = x > running_max
    running_sum = tl.where(grew, running_sum * decay + 1.0, running_sum + decay)
    return new_max, running_sum, decay, grew


@triton.jit
def online_centered_update(running_total, centered_value, old_max, old_sum, new_max, decay, grew):
    """Running sum of ``exp2(x - max) * value`` for a value centered on the lane's running max of x
    (such as ``x - max``), kept alongside :func:`online_logsumexp_update` (``old_*`` its inputs,
    ``new_max``, ``decay`` and ``grew`` its outputs). Where the max grows, every value moves by
    ``old_max - new_max`` and the old total with them. Centered, a value near the max keeps its
    precision however far the max is from 0: a running sum of ``exp2(x - max) * x`` is rounded at the
    ulp of x, which at x = -1000 is larger than a small entropy or divergence."""
    moved = running_total + tl.where(old_sum == 0.0, 0.0, (old_max - new_max) * old_sum)
    return tl.where(grew, moved * decay + centered_value, running_total + decay * centered_value)


@triton.jit
def centered_row_total(lane_total, lane_max, lane_sum, lane_weight, row_max):
    """Row sum of ``exp2(x - row_max) * value`` from per-lane :func:`online_centered_update` totals,
    the value centered on the row's max (``lane_weight``, ``row_max`` from :func:`lane_weights`);
    divided by the row sum of exp2, it is the row mean."""
    moved = lane_total + tl.where(lane_sum == 0.0, 0.0, (lane_max - row_max) * lane_sum)
    return tl.sum(moved * lane_weight, 0)


@triton.jit
def lane_weights(lane_max, lane_sum, scale):
    """Combine per-lane running pairs into ``(weight of each lane, row max, row sum of exp2)``.

    The row's log2-sum-exp2 is ``row_max * scale + log2(row_sum)``; a weighted running total kept per
    lane becomes a row mean as ``sum(total * weight) / row_sum``.
    """
    row_max = tl.max(lane_max, 0)
    safe_max = tl.where(row_max == NEG_INF, 0.0, row_max)
    weight = tl.exp2((lane_max - safe_max) * scale)
    return weight, row_max, tl.sum(lane_sum * weight, 0)


@triton.jit
def log2_probs(x, row_max, scale, log2_row_sum):
    """log2 softmax(x * scale / log2 e) = (x - max) * scale - log2(sum): the shift is exact and only
    the difference is rounded by the scaling, so large logits lose no precision."""
    return (x - row_max) * scale - log2_row_sum


@triton.jit
def log2_1p(x):
    """log2(1 + x) accurate for small x (the rounding of 1 + x cancels; libdevice's log1p is not
    available in the interpreter)."""
    one_plus_x = 1.0 + x
    return tl.where(one_plus_x == 1.0, x * LOG2_E, tl.log2(one_plus_x) * (x / (one_plus_x - 1.0)))


@triton.jit
def target_logit(log_partial, log_full, lam, clip):
    """z = la + lam * clamp(lf - la, -clip, clip) in base 2, with the -inf conventions of SPEC §1.

    A token the anchor forbids (la = -inf) has residual 0, so z stays -inf. A residual of -inf (only
    with clip = inf and lf = -inf) forbids the token for lam > 0 and is ignored for lam = 0.
    """
    residual = tl.clamp(log_full - log_partial, -clip, clip, propagate_nan=ALL_NAN)
    residual = tl.where(log_partial == NEG_INF, 0.0, residual)
    forbidden = tl.where(lam > 0, NEG_INF, 0.0)
    scaled = tl.where(residual == NEG_INF, forbidden, lam * residual)
    return log_partial + scaled


@triton.jit
def allowed_where_forbidden(log_allowing, log_forbidding):
    """True where one distribution allows a token (log-probability > -inf) that the other forbids:
    KL(allowing || forbidding) is then +inf, however far the allowing probability underflows."""
    return (log_allowing > NEG_INF) & (log_forbidding == NEG_INF)


@triton.jit
def infinite_if(total, flag):
    """+inf when ``flag`` (an :func:`allowed_where_forbidden` flag reduced over the row) is set, else
    ``total``; NaN stays NaN. For a running sum that is rescaled, where an infinite term would become NaN."""
    return tl.where((flag > 0) & (total == total), float("inf"), total)


@triton.jit
def kl_term(weight, log_ratio, infinite):
    """A term ``weight * log_ratio`` of a KL divergence for a plain running sum: 0 where the weight is
    exactly 0, +inf where ``infinite`` (:func:`allowed_where_forbidden`) however far the weight
    underflowed, NaN where either is NaN."""
    return tl.where(infinite, float("inf"), weighted_term(weight, log_ratio))


@triton.jit
def weighted_term(weight, value):
    """weight * value, exactly 0 where the weight is exactly 0 (0 log 0 = 0); NaN weights stay NaN."""
    return tl.where(weight == 0.0, 0.0, weight * value)
