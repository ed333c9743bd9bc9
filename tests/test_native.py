"""The native CPU kernel (csrc/, aropd_kernels/native.py) against the float64 gold and the reference.

The hypothesis suite of test_properties.py already runs against backend="native" when it is built;
this file adds what is specific to the C++ kernel: very large V, every input dtype and mixed dtypes,
inplace_grad, 64-bit offsets, NaN and -inf handling, the dtype conversions, and the behaviour when the
kernel is not built. Set AROPD_REQUIRE_NATIVE=1 (CI does) to make a missing build a failure.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import strategies as st

from aropd_kernels import anchored_residual_kl, native, reference
from conftest import fixed_and_random
from strategies import problems
from test_properties import check_against_gold, confident_student_problem

built = pytest.mark.skipif(not native.available(), reason=f"native kernel not built: {native.unavailable_reason()}")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INSTRUCTION_SETS = native.instruction_sets() if native.available() else ["none"]


@pytest.fixture(autouse=True, params=INSTRUCTION_SETS)
def instruction_set(request):
    """Every test here runs once per copy of the kernel this CPU can run (AVX-512, AVX2, baseline),
    not only the one the dispatcher picks: each copy is compiled separately, with its own vector
    width and, for AVX-512, its own exp."""
    if request.param == "none":
        yield request.param
        return
    native._select_instruction_set(request.param)
    try:
        yield request.param
    finally:
        native._select_instruction_set(INSTRUCTION_SETS[0])


def test_kernel_is_built_where_required():
    if os.environ.get("AROPD_REQUIRE_NATIVE", "0") != "0":
        assert native.available(), native.unavailable_reason()
    assert native.available() == (native.unavailable_reason() is None)


def test_missing_kernel_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(native, "_native", None)
    monkeypatch.setattr(native, "_IMPORT_ERROR", ImportError("no module named aropd_kernels._native"))
    monkeypatch.setattr(native, "_BUILD_STATUS", native._BUILD_STATUS.with_name("no_such_status_file.txt"))
    student = torch.randn(2, 5)
    with pytest.raises(ValueError, match="backend='native' is not built: .*_native"):
        anchored_residual_kl(student, student.clone(), student.clone(), backend="native")
    loss = anchored_residual_kl(student, student.clone(), student.clone(), backend="auto")  # falls back
    assert torch.isfinite(loss)


# --- against the float64 gold ----------------------------------------------------------------------


@built
@fixed_and_random(problem=problems())
def test_property_suite_under_each_instruction_set(problem):
    check_against_gold(problem, "native")


@built
def test_instruction_set_in_use_is_the_selected_one(instruction_set):
    assert native.instruction_set() == instruction_set


@built
@fixed_and_random(max_examples=2, problem=problems(max_rows=2, vocab_sizes=(262_208,)))
def test_largest_vocabulary_matches_gold(problem):
    check_against_gold(problem, "native")


@built
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@fixed_and_random(max_examples=8, data=st.data())
def test_each_input_dtype_matches_gold(dtype, data):
    problem = data.draw(problems(dtypes=(dtype,)))
    check_against_gold(problem._replace(partial=problem.partial.to(dtype), full=problem.full.to(dtype)), "native")


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_confident_student_keeps_the_gradient_rule_under_each_instruction_set(dtype):
    """Reverse KL of 15 to 115 nats: the float32 gradient's float64 sums (ExactStudentSums) and the
    half-precision path (RoundedStudentSums) of each copy, with 4, 8 and 16 lanes."""
    for vocab in (3, 7, 64, 1000):
        for seed in range(12):
            check_against_gold(confident_student_problem(vocab, dtype, seed), "native")


@built
@pytest.mark.parametrize("dtypes", [
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.bfloat16, torch.float32),
    (torch.float32, torch.float16, torch.bfloat16),
], ids=lambda d: "-".join(str(x).removeprefix("torch.") for x in d))
@fixed_and_random(max_examples=5, data=st.data())
def test_mixed_dtypes_match_gold(dtypes, data):
    problem = data.draw(problems(dtypes=(torch.float32,)))
    student, partial, full = (t.to(d) for t, d in zip(problem[:3], dtypes))
    check_against_gold(problem._replace(student=student, partial=partial, full=full), "native")


# --- gradient into the student's buffer ------------------------------------------------------------


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # float16 in place is refused
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.4])
def test_inplace_grad_equals_the_separate_gradient(dtype, beta):
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 4, 1031, generator=generator).mul(3)
    partial, full = torch.randn(2, 3, 4, 1031, generator=generator).mul(3).to(dtype)
    kwargs = dict(beta=beta, lam=0.8, clip=2.0, backend="native", mask=torch.rand(3, 4, generator=generator) > 0.3)

    separate = logits.to(dtype).clone().requires_grad_(True)
    expected_loss = anchored_residual_kl(separate, partial, full, **kwargs)
    expected_loss.backward()

    leaf = logits.to(dtype).clone().requires_grad_(True)
    student = leaf * 1  # a non-leaf, as a model's logits are
    loss = anchored_residual_kl(student, partial, full, inplace_grad=True, **kwargs)
    loss.backward()
    assert torch.equal(loss, expected_loss)
    assert torch.equal(leaf.grad, separate.grad), "same kernel, same bits, whichever buffer receives them"
    assert torch.equal(student.detach(), separate.grad), "the student's storage holds the gradient"


# --- 64-bit offsets --------------------------------------------------------------------------------


@built
def test_row_offsets_beyond_two_to_the_31():
    """A row stride of more than 2^31 elements, without gigabytes of memory.

    One bfloat16 storage of 2^31 + 4 V elements is reserved; the OS backs only the pages touched, so
    this costs a few pages of memory, not 4 GB. Student, teachers and gradient are [1, 2, V] views into
    it with row stride 2^31 + 3: the second row of each lies beyond 2^31 elements (2^32 bytes), where a
    32-bit offset computation would wrap and read or write the wrong place. The kernel must give exactly
    the bits it gives on compact copies of the same rows.
    """
    vocab = 1000
    row_stride = 2**31 + 3
    storage = torch.empty(row_stride + 4 * vocab, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(3)

    def view(slot):
        return storage.as_strided((1, 2, vocab), (2 * row_stride, row_stride, 1), slot * vocab)

    student, partial, full, grad = (view(slot) for slot in range(4))
    for tensor in (student, partial, full):
        tensor.copy_(torch.randn(1, 2, vocab, generator=generator).mul(2))
    assert grad.storage_offset() + grad.stride(1) > 2**31, "the last row must start beyond 2^31 elements"

    rows = dict(row_temperature=torch.tensor([1.0, 0.7]), active=torch.ones(2, dtype=torch.bool),
                grad_scale=torch.tensor([0.5, 0.25]))
    scalars = dict(lam=1.0, clip=5.0, beta=1.0, with_diagnostics=True)
    result = native.compute_rows(student, partial, full, grad_out=grad, **rows, **scalars)

    compact = [t.contiguous() for t in (student, partial, full)]
    compact_grad = torch.empty_like(compact[0])
    expected = native.compute_rows(*compact, grad_out=compact_grad, **rows, **scalars)
    assert torch.equal(result.row_loss, expected.row_loss)
    assert torch.equal(result.diagnostics, expected.diagnostics)
    assert torch.equal(grad, compact_grad)
    assert torch.all(grad[0, 1] != 0), "the row beyond 2^31 received its gradient"

    per_token = anchored_residual_kl(student, partial, full, reduction="none", backend="native")
    torch.testing.assert_close(per_token, anchored_residual_kl(*compact, reduction="none", backend="reference"))


# --- NaN and -inf ----------------------------------------------------------------------------------


def _rows(n_rows, vocab, generator, dtype=torch.float32):
    return [torch.randn(n_rows, vocab, generator=generator).mul(2).to(dtype) for _ in range(3)]


@built
@pytest.mark.parametrize("where", ["student", "partial", "full"])
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
def test_nan_in_an_input_propagates_to_its_row_only(where, beta):
    generator = torch.Generator().manual_seed(11)
    inputs = dict(zip(("student", "partial", "full"), _rows(3, 700, generator)))
    inputs[where][1, 345] = math.nan
    losses, diagnostics = anchored_residual_kl(*inputs.values(), beta=beta, reduction="none", backend="native",
                                               return_diagnostics=True)
    assert torch.isnan(losses[1])
    expected = anchored_residual_kl(*inputs.values(), beta=beta, reduction="none", backend="reference")
    keep = torch.tensor([True, False, True])
    torch.testing.assert_close(losses[keep], expected[keep], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(torch.stack(diagnostics[:4])[:, keep]).all()


@built
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
def test_negative_infinity_padding_gives_zero_gradient_and_no_nan(dtype, beta):
    generator = torch.Generator().manual_seed(5)
    vocab, padding = 1037, 13  # padding crosses a 16-lane vector and ends in a partial one
    student, partial, full = _rows(4, vocab, generator, dtype)
    for tensor in (student, partial, full):
        tensor[:, vocab - padding:] = -math.inf
    partial[0, 3] = -math.inf  # a token the anchor forbids
    full[1, 4] = -math.inf  # a token only the full teacher forbids
    student.requires_grad_(True)
    losses, diagnostics = anchored_residual_kl(student, partial, full, beta=beta, reduction="none",
                                               backend="native", return_diagnostics=True)
    losses.sum().backward()
    finite_rows = torch.tensor([beta != 1.0, True, True, True])  # reverse KL: student mass where q = 0
    assert torch.isfinite(losses[finite_rows]).all()
    assert torch.isfinite(student.grad[finite_rows]).all()
    assert torch.all(student.grad[:, vocab - padding:] == 0)
    assert not torch.isnan(torch.stack(diagnostics[:4])).any()
    if beta == 1.0:
        assert losses[0] == math.inf and not torch.isfinite(student.grad[0].float()).all()


# --- dtype conversions, exhaustively ---------------------------------------------------------------


def _convert(source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    target = torch.empty(source.shape, dtype=dtype)
    native._module().convert(source.data_ptr(), native._dtype_code(source, "source"), target.data_ptr(),
                             native._dtype_code(target, "target"), source.numel())
    return target


def _assert_same_values(actual: torch.Tensor, expected: torch.Tensor):
    assert torch.equal(actual.isnan(), expected.isnan())
    keep = ~expected.isnan()
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[actual.dtype]
    assert torch.equal(actual[keep].view(bits), expected[keep].view(bits))  # also tells -0 from +0


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_16_bit_pattern_widens_exactly(dtype):
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    _assert_same_values(_convert(patterns, torch.float32), patterns.float())


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_narrowing_rounds_to_nearest_even(dtype):
    generator = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31, (1 << 20,), dtype=torch.int64, generator=generator)
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 2.0**-14, 2.0**-24, 2.0**-25,
                          1.5 * 2.0**-24, 2.0**-25 * 1.0000001, 3.0e38, math.inf, -math.inf, math.nan, 1.0 + 2.0**-8,
                          1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11])
    values = torch.cat([random_bits.to(torch.int32).view(torch.float32), edges, -edges])
    halfway = torch.arange(1, 1 << 16, dtype=torch.int32).view(torch.float32)  # float32 subnormals
    values = torch.cat([values, halfway, (torch.arange(0, 1 << 16, dtype=torch.int32) << 13 | 0x1000).view(torch.float32)])
    _assert_same_values(_convert(values, dtype), values.to(dtype))


# --- the backend contract's own checks -------------------------------------------------------------


@built
def test_contract_checks_layout_and_dtypes():
    rows = dict(row_temperature=torch.ones(2), active=torch.ones(2, dtype=torch.bool), lam=1.0, clip=5.0, beta=1.0,
                with_diagnostics=False)
    good = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="unit stride in V"):
        strided = torch.randn(1, 2, 16)[..., ::2]
        native.compute_rows(strided, good, good, grad_scale=None, grad_out=None, **rows)
    with pytest.raises(ValueError, match="partial must be a .B, T, V. view of the student's shape"):
        native.compute_rows(good, good.view(2, 1, 8), good, grad_scale=None, grad_out=None, **rows)
    with pytest.raises(TypeError, match="grad_out must be float32 or the student.s dtype"):
        native.compute_rows(good, good, good, grad_scale=torch.ones(2), grad_out=good.half(), **rows)
    with pytest.raises(ValueError, match="row_temperature must be a CPU torch.float32"):
        native.compute_rows(good, good, good, grad_scale=None, grad_out=None,
                            **{**rows, "row_temperature": torch.ones(2, dtype=torch.float64)})
    reference_loss = reference.compute_rows(good, good, good, grad_scale=None, grad_out=None, **rows).row_loss
    torch.testing.assert_close(native.compute_rows(good, good, good, grad_scale=None, grad_out=None, **rows).row_loss,
                               reference_loss)
