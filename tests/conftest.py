"""Shared fixtures: the float64 gold of SPEC §1 and the comparison rules of SPEC §4.

The gold is written independently of ``aropd_kernels.reference``: losses and diagnostics from the
definitions, and the gradient from float64 autograd of that loss (not from the closed forms that
every backend implements), so a wrong derivation in docs/math.md cannot hide in both.
"""

from __future__ import annotations

import inspect
import math
import os
import random
from typing import NamedTuple

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's CPU interpreter. The switch must be set before
# aropd_kernels.triton is imported (triton.jit reads it when the kernels are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, given, seed, settings

from aropd_kernels import backends

if backends._triton_interpreter_enabled() and backends.triton_available():
    import interpreter_rounding  # the interpreter rounds float32 -> bfloat16 as the GPU does

    interpreter_rounding.install()

# HYPOTHESIS_PROFILE sets the number of draws: "ci" (the default) or "dev" (many more). Property tests
# run that number twice (fixed_and_random); other @given tests draw the profile's derandomized set.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(HYPOTHESIS_PROFILE)
RANDOM_SEED = int(os.environ.get("AROPD_HYPOTHESIS_SEED") or random.SystemRandom().getrandbits(32))


def _seed_line() -> str:
    return (f"hypothesis: profile {HYPOTHESIS_PROFILE}, random draws from seed {RANDOM_SEED} "
            f"(replay them with AROPD_HYPOTHESIS_SEED={RANDOM_SEED})")


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter):  # also under -q, which hides the header
    terminalreporter.write_line(_seed_line())


def fixed_and_random(max_examples: int | None = None, **strategies):
    """``hypothesis.given`` for the property tests, collected twice: ``[fixed]``, a derandomized set of
    draws, the same on every run, and ``[random]``, as many new draws from ``RANDOM_SEED``.
    ``max_examples`` overrides the profile's count for both."""
    count = {} if max_examples is None else {"max_examples": max_examples}

    def decorate(test):
        variants = {
            "fixed": settings(derandomize=True, **count)(given(**strategies)(test)),
            "random": seed(RANDOM_SEED)(settings(derandomize=False, **count)(given(**strategies)(test))),
        }

        def run(draws, **fixtures):
            variants[draws](**fixtures)

        parameters = inspect.signature(variants["fixed"]).parameters.values()  # the fixtures, not the draws
        run.__signature__ = inspect.Signature(
            [inspect.Parameter("draws", inspect.Parameter.POSITIONAL_OR_KEYWORD), *parameters])
        run.__name__, run.__qualname__, run.__doc__ = test.__name__, test.__qualname__, test.__doc__
        return pytest.mark.parametrize("draws", list(variants))(run)

    return decorate

NEG_INF = float("-inf")
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5  # SPEC §4, per-token loss and diagnostics
# SPEC §4 gradient rule (Cut Cross-Entropy's): a backend's error against the gold may exceed the
# error of plain float32 torch rounded to the student's dtype by this factor, plus this fraction of
# the gradient's natural unit w_i / T_i (a gradient entry is p_v times O(1) log-probability
# differences over T, so float32 rounding of those differences leaves errors of a few 1e-7 units
# whatever the size of the result); and each entry's error counts only beyond the same fraction of
# the entry's own size (see assert_grad_close). Stated in docs/api.md.
GRAD_ERROR_FACTOR, GRAD_ERROR_FLOOR = 2.0, 1e-6


def backends_under_test() -> list[str]:
    """Every backend that can run on this machine: reference always, the kernels when present."""
    names = ["reference"]
    if backends.native_available():
        names.append("native")
    if backends.triton_available() and (torch.cuda.is_available() or backends._triton_interpreter_enabled()):
        names.append("triton")
    return names


def device_for(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


class Gold(NamedTuple):
    loss: torch.Tensor  # [N] float64, D_i
    diagnostics: torch.Tensor  # [4, N] float64
    grad: torch.Tensor  # [N, V] float64, dD_i/ds


def _safe(condition: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value where condition, else 0: keeps autograd free of 0 * inf at masked entries."""
    return torch.where(condition, value, torch.zeros_like(value))


def gold_target(la: torch.Tensor, lf: torch.Tensor, lam: float, clip: float) -> torch.Tensor:
    """log q from the teachers' log-probabilities, with the -inf conventions of docs/math.md."""
    both_finite = (la > NEG_INF) & (lf > NEG_INF)
    z = la + lam * _safe(both_finite, lf - la).clamp(-clip, clip)
    if lam > 0:  # full teacher forbids, anchor allows: residual is -clip
        z = torch.where((la > NEG_INF) & (lf == NEG_INF), la - lam * clip, z)
    z = torch.where(la == NEG_INF, torch.full_like(z, NEG_INF), z)
    return torch.log_softmax(z, dim=-1)


def _infinite_where(total: torch.Tensor, log_allowing: torch.Tensor, log_forbidding: torch.Tensor) -> torch.Tensor:
    """+inf on rows with a token that ``log_allowing`` allows and ``log_forbidding`` forbids: there
    KL(allowing || forbidding) is +inf in exact arithmetic, even where the allowing probability
    underflows to 0 in float64 (logits of scale 50 at T = 0.05 reach log-probabilities far below -745)."""
    infinite = ((log_allowing > NEG_INF) & (log_forbidding == NEG_INF)).any(-1) & ~total.isnan()
    return torch.where(infinite, torch.full_like(total, math.inf), total)


def gold(student, partial, full, *, lam, clip, beta, temperature, dtype=torch.float64) -> Gold:
    """Evaluation of SPEC §1 on [N, V] inputs; temperature is a float or a [N] tensor.

    ``dtype=torch.float64`` is the gold; ``dtype=torch.float32`` is the straightforward float32 torch
    computation whose error sets the gradient tolerance (SPEC §4).
    """
    temperature = temperature.to(dtype).unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature
    s = student.detach().to(dtype).cpu().requires_grad_(True)
    la = torch.log_softmax(partial.detach().to(dtype).cpu() / temperature, dim=-1)
    lf = torch.log_softmax(full.detach().to(dtype).cpu() / temperature, dim=-1)
    lq = gold_target(la, lf, lam, clip)
    ls = torch.log_softmax(s / temperature, dim=-1)
    p, q = ls.exp(), lq.exp()
    if beta == 1.0:
        loss = (p * (_safe(p > 0, ls) - _safe(p > 0, lq))).sum(-1)
    elif beta == 0.0:
        loss = (q * (_safe(q > 0, lq) - _safe(q > 0, ls))).sum(-1)
    else:
        either = (p > 0) | (q > 0)  # both zero: keep logaddexp(-inf, -inf) out of autograd
        lm = _safe(either, torch.logaddexp(math.log(beta) + _safe(either, lq), math.log1p(-beta) + _safe(either, ls)))
        loss = beta * (q * (_safe(q > 0, lq) - _safe(q > 0, lm))).sum(-1) + (1 - beta) * (
            p * (_safe(p > 0, ls) - _safe(p > 0, lm))
        ).sum(-1)
    (grad,) = torch.autograd.grad(loss.sum(), s) if loss.numel() else (torch.zeros_like(s),)
    with torch.no_grad():
        if beta == 1.0:
            loss = _infinite_where(loss, ls, lq)
            # the gradient of a +inf loss is not defined (docs/math.md); autograd gives a finite one
            # where p underflows in float64 too
            grad = torch.where(torch.isinf(loss).unsqueeze(-1), torch.full_like(grad, math.nan), grad)
        elif beta == 0.0:
            loss = _infinite_where(loss, lq, ls)  # its gradient p - q stays finite: autograd's is kept
        q_full = lf.exp()
        belief_shift = (q_full * (_safe(q_full > 0, lf) - _safe(q_full > 0, la))).sum(-1)
        belief_shift = _infinite_where(belief_shift, lf, la)
        clipped_mass = _safe((lf - la).abs() > clip, q_full).sum(-1)
        student_entropy = -(p * _safe(p > 0, ls)).sum(-1)
        target_entropy = -(q * _safe(q > 0, lq)).sum(-1)
        diagnostics = torch.stack([belief_shift, clipped_mass, student_entropy, target_entropy])
    return Gold(loss.detach(), diagnostics, grad)


def gold_token_logprobs(student, partial, full, labels, *, lam, clip, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (log p, log q) at each row's label; ``full=None`` for one teacher (q = softmax(partial / T)).
    Labels outside [0, V) give 0."""
    temperature = temperature.double().unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature
    log_student = torch.log_softmax(student.double() / temperature, dim=-1)
    la = torch.log_softmax(partial.double() / temperature, dim=-1)
    log_target = la if full is None else gold_target(la, torch.log_softmax(full.double() / temperature, dim=-1),
                                                     lam, clip)
    inside = (labels >= 0) & (labels < student.shape[-1])
    index = labels.clamp(0, student.shape[-1] - 1).unsqueeze(-1)
    pick = [torch.where(inside, x.gather(-1, index).squeeze(-1), 0.0) for x in (log_student, log_target)]
    return pick[0], pick[1]


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "loss") -> None:
    """SPEC §4: |error| <= 1e-4 |value| + 1e-5, with +inf where the gold is +inf and NaN where it is
    NaN (a target that forbids every token)."""
    actual = actual.detach().double().cpu()
    expected = expected.double()
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{what}: infinities differ"
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaNs differ"
    finite = torch.isfinite(expected)
    assert not torch.isnan(actual[finite]).any(), f"{what}: NaN where the gold is finite"
    torch.testing.assert_close(actual[finite], expected[finite], rtol=LOSS_RTOL, atol=LOSS_ATOL, msg=what)


def grad_errors(actual: torch.Tensor, expected: torch.Tensor, free: float = 0.0,
                allowance: torch.Tensor | None = None) -> tuple[float, float]:
    """(max-abs, L2 norm) of a gradient's error against the float64 gold, each entry's error counted
    only beyond ``free`` times the entry's own size, and beyond its ``allowance`` (absolute, per entry)."""
    difference = (actual.double().cpu() - expected).abs() - free * expected.abs()
    if allowance is not None:
        difference = difference - allowance
    difference = difference.clamp(min=0.0)
    max_abs = difference.max().item() if difference.numel() else 0.0
    return max_abs, difference.norm().item()


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, baseline: torch.Tensor, unit: float,
                      free: float = GRAD_ERROR_FLOOR, allowance: torch.Tensor | None = None) -> None:
    """SPEC §4 (Cut Cross-Entropy's rule): max-abs and L2 errors at most GRAD_ERROR_FACTOR x those of
    the plain float32 torch gradient (``baseline``, already rounded to the student's dtype) plus
    GRAD_ERROR_FLOOR x ``unit``, the largest per-row factor w_i / T_i.

    Each entry's error counts only beyond GRAD_ERROR_FLOOR (about 8 float32 ulps) of the entry's own
    size: with logits of scale 50 at T = 0.05 an entry reaches thousands of units, any float32
    evaluation leaves a few ulps of it, and how luckily plain torch rounded the few largest entries
    is chance, not a bound. Small entries, such as a confident token's cancelling p (d - D), get no
    such allowance: the error of a rounded D still shows there. ``free`` and ``allowance`` (absolute, per
    entry) widen it for a gradient computed in half precision all along (see
    :func:`half_precision_rounding`)."""
    assert not torch.isnan(actual).any(), "NaN in a gradient whose gold is finite"
    max_abs, l2 = grad_errors(actual, expected, free=free, allowance=allowance)
    base_max_abs, base_l2 = grad_errors(baseline, expected)
    floor = GRAD_ERROR_FLOOR * unit
    assert max_abs <= GRAD_ERROR_FACTOR * base_max_abs + floor, (
        f"max-abs gradient error {max_abs:.3e} vs plain float32 torch {base_max_abs:.3e}"
    )
    rows = max(actual.shape[0], 1) if actual.dim() else 1
    assert l2 <= GRAD_ERROR_FACTOR * base_l2 + floor * math.sqrt(rows), (
        f"L2 gradient error {l2:.3e} vs plain float32 torch {base_l2:.3e}"
    )


def half_precision_rounding(dtype: torch.dtype) -> float:
    """Half an ulp of ``dtype``, relative: what one rounding to it may move a value.

    A gradient formed by matmuls in half precision carries the roundings of the logits' gradient
    (each entry moved by up to this much of itself, by the row kernel and again by the chain rule) and
    the rounding of the matmul's output, as its baseline (autograd in that dtype) does at other places.
    Where the matmul's terms cancel, the first reach far beyond the result's own ulp, and with a handful
    of entries which of the two computations was luckier is chance: the checks then count each entry's
    error only beyond its own rounding (``free``) and beyond twice this much of the absolute-value
    product, ``|dD/dlogits| · |W|`` (``allowance``), that the logits' gradient's roundings can move it."""
    return torch.finfo(dtype).eps / 2


@pytest.fixture(params=backends_under_test(), scope="session")
def backend(request) -> str:
    return request.param
