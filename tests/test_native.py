"""The native CPU kernel (csrc/, aropd_kernels/native.py) against the float64 gold and the reference.

The hypothesis suites of test_properties.py, test_one_teacher.py and test_shards.py already run
against backend="native" when it is built; this file adds what is specific to the C++ kernel: every
test under each instruction-set copy, very large V, every input dtype and mixed dtypes, inplace_grad,
64-bit offsets, NaN and -inf handling, the dtype conversions, the one-teacher variant's own pass 1
(StudentTeacherGap), labels at the kernel's block boundaries, the shard stages' layouts, and the
behaviour when the kernel is not built. Set AROPD_REQUIRE_NATIVE=1 (CI does) to make a missing build
a failure.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import strategies as st

from aropd_kernels import anchored_residual_kl, distillation_divergence, native, reference, shards
from conftest import assert_grad_close, assert_loss_close, fixed_and_random, gold, gold_token_logprobs
from strategies import Problem, problems
from test_one_teacher import check_one_teacher_against_gold
from test_properties import check_against_gold, confident_student_problem
from test_shards import check_sharded_against_gold

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


# --- one teacher ----------------------------------------------------------------------------------


def _all_labels(problem: Problem, seed: int) -> torch.Tensor:
    vocab = problem.student.shape[-1]
    return torch.randint(0, vocab, problem.student.shape[:-1], generator=torch.Generator().manual_seed(seed))


@built
@fixed_and_random(problem=problems(), seed=st.integers(0, 2**31 - 1))
def test_one_teacher_property_suite_under_each_instruction_set(problem, seed):
    labels = torch.where(torch.rand(problem.student.shape[:-1], generator=torch.Generator().manual_seed(seed)) < 0.2,
                         -100, _all_labels(problem, seed))
    check_one_teacher_against_gold(problem, labels, "native")


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_teacher_confident_student_keeps_the_gradient_rule(dtype):
    """The teacher pushes the student's confident token far down (reverse KL of 15 to 115 nats): a
    float32 gradient takes the target pass (ExactStudentSums), a bfloat16 one StudentTeacherGap; with
    diagnostics both take the target pass, and so does the gradient of the shard stages."""
    for vocab in (3, 7, 64, 1000):
        for seed in range(12):
            problem = confident_student_problem(vocab, dtype, seed)
            problem = problem._replace(partial=problem.full)
            check_one_teacher_against_gold(problem, _all_labels(problem, seed), "native")
            _check_one_teacher_gradient_with_diagnostics(problem)
            check_sharded_against_gold("native", problem, [0, vocab // 2, vocab] if vocab > 3 else [0, vocab], True)


def _check_one_teacher_gradient_with_diagnostics(problem):
    student = problem.student.detach().clone().requires_grad_(True)
    loss, _ = distillation_divergence(student, problem.partial, temperature=problem.temperature, reduction="sum",
                                      return_diagnostics=True, backend="native")
    loss.backward()
    flat = dict(student=problem.student.detach(), partial=problem.partial, full=problem.partial, lam=0.0, clip=math.inf,
                beta=1.0, temperature=problem.temperature)
    baseline = gold(**flat, dtype=torch.float32).grad.to(problem.student.dtype)
    assert_grad_close(student.grad, gold(**flat).grad, baseline, 1.0 / problem.temperature)


def _ramp(rows, vocab, height, generator, dtype):
    """Logits whose maxima climb block after block (by height over the row), plus noise."""
    return (torch.linspace(0.0, height, vocab) + torch.randn(rows, vocab, generator=generator) * 3).to(dtype)


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("student_offset, teacher_offset", [(0.0, 0.0), (1000.0, -1000.0), (-600.0, 900.0)])
@pytest.mark.parametrize("climbs", [(0.0, 0.0), (200.0, 0.0), (0.0, 200.0), (150.0, -150.0)])
def test_one_teacher_reverse_kl_with_far_apart_and_moving_maxima(dtype, student_offset, teacher_offset, climbs):
    """StudentTeacherGap takes the gap from each lane's running maxima and carries its sum when they
    move: logits far apart (offsets of the two inputs) and maxima that climb across blocks (ramps of
    either input), for the loss alone and with the gradient."""
    generator = torch.Generator().manual_seed(int(student_offset) + int(climbs[0]) + 7 * int(climbs[1]))
    rows, vocab = 3, 1500
    student = _ramp(rows, vocab, climbs[0], generator, torch.float32) + student_offset
    teacher = _ramp(rows, vocab, climbs[1], generator, torch.float32) + teacher_offset
    problem = Problem(student.to(dtype), teacher.to(dtype), teacher.to(dtype), lam=0.0, clip=math.inf, beta=1.0,
                      temperature=0.8, mask=None, weights=None)
    check_one_teacher_against_gold(problem, _all_labels(problem, 0), "native")
    loss_only = distillation_divergence(problem.student, problem.partial, temperature=0.8, reduction="none",
                                        backend="native")
    expected = gold(problem.student, problem.partial, problem.partial, lam=0.0, clip=math.inf, beta=1.0,
                    temperature=0.8)
    assert_loss_close(loss_only, expected.loss, "loss without the gradient")


@built
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
def test_one_teacher_negative_infinity_padding_and_forbidden_tokens(dtype, beta):
    generator = torch.Generator().manual_seed(9)
    vocab, padding = 1037, 13
    student, teacher, _ = _rows(4, vocab, generator, dtype)
    for tensor in (student, teacher):
        tensor[:, vocab - padding:] = -math.inf
    teacher[0, 3] = -math.inf  # the target forbids a token the student allows: reverse KL is +inf
    student[1, 5] = -math.inf  # the student forbids a token the target allows: forward KL is +inf
    student[2, :600] = -math.inf  # the student's first blocks carry no mass
    teacher[3, :600] = -math.inf  # nor the teacher's, where the student has none either
    student[3, :600] = -math.inf
    student.requires_grad_(True)
    losses = distillation_divergence(student, teacher, beta=beta, reduction="none", backend="native")
    losses.sum().backward()
    expected = gold(student.detach(), teacher, teacher, lam=0.0, clip=math.inf, beta=beta, temperature=1.0)
    assert_loss_close(losses, expected.loss)
    finite_rows = torch.isfinite(expected.grad).all(-1)
    assert torch.isfinite(student.grad[finite_rows]).all()
    assert torch.all(student.grad[:, vocab - padding:] == 0)
    assert torch.all(student.grad[3, :600] == 0)
    if beta == 1.0:
        assert not finite_rows[0] and not torch.isfinite(student.grad[0].float()).all()


# --- labels ----------------------------------------------------------------------------------------


# Around every block boundary of the three copies (128, 256 and 512 elements), inside vectors of 4, 8
# and 16 lanes, and the last token.
BOUNDARY_LABELS = [0, 3, 4, 15, 16, 127, 128, 129, 255, 256, 511, 512, 513, 1023, 1024, 1030]


@built
@pytest.mark.parametrize("one_teacher", [True, False], ids=["one teacher", "anchored"])
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["separate gradient", "inplace_grad"])
def test_labels_at_block_boundaries_and_the_last_token(one_teacher, beta, dtype, inplace):
    generator = torch.Generator().manual_seed(13)
    vocab = 1031
    rows = len(BOUNDARY_LABELS)
    student, partial, full = _rows(rows, vocab, generator, dtype)
    labels = torch.tensor(BOUNDARY_LABELS)
    expected = gold_token_logprobs(student, partial, None if one_teacher else full, labels, lam=0.8, clip=2.0,
                                   temperature=0.9)
    loss_fn = distillation_divergence if one_teacher else anchored_residual_kl
    teachers = dict(teacher_logits=partial) if one_teacher else dict(
        partial_teacher_logits=partial, full_teacher_logits=full, lam=0.8, clip=2.0)
    leaf = student.clone().requires_grad_(True)
    logits = leaf * 1 if inplace else leaf
    _, diagnostics = loss_fn(logits, labels=labels, beta=beta, temperature=0.9, return_diagnostics=True,
                             inplace_grad=inplace, backend="native", **teachers)
    assert_loss_close(diagnostics.student_token_logprob, expected[0], "student_token_logprob")
    assert_loss_close(diagnostics.target_token_logprob, expected[1], "target_token_logprob")


@built
@pytest.mark.parametrize("one_teacher", [True, False], ids=["one teacher", "anchored"])
def test_labels_outside_the_columns_give_zero_and_none_give_zero(one_teacher):
    """The per-row contract: a label outside [0, V) (as a vocabulary shard sees most labels), and no
    labels at all, leave the two token diagnostics at 0; the others are untouched by labels."""
    generator = torch.Generator().manual_seed(17)
    student, partial, full = (t.reshape(1, 4, 300) for t in _rows(4, 300, generator))
    rows = dict(row_temperature=torch.ones(4), active=torch.ones(4, dtype=torch.bool), grad_scale=None,
                grad_out=None, lam=1.0, clip=5.0, beta=1.0, with_diagnostics=True)
    teachers = (partial, None if one_teacher else full)
    labelled = native.compute_rows(student, *teachers, labels=torch.tensor([-1, 300, 10**12, 7]), **rows)
    unlabelled = native.compute_rows(student, *teachers, **rows)
    assert torch.equal(labelled.diagnostics[4:, :3], torch.zeros(2, 3))
    assert torch.all(labelled.diagnostics[4:, 3] != 0)
    assert torch.equal(unlabelled.diagnostics[4:], torch.zeros(2, 4))
    assert torch.equal(labelled.diagnostics[:4], unlabelled.diagnostics[:4])
    assert torch.equal(labelled.row_loss, unlabelled.row_loss)


# --- the shard stages ------------------------------------------------------------------------------


@built
def test_stage_layouts_are_those_of_shards_py():
    """The C++ writes and reads the stages' arrays by its own row tables: they must be shards.py's."""
    module = native._module()
    assert [getattr(shards, name) for name in module.TARGET_SUM_ROWS] == list(range(shards.N_TARGET_SUMS))
    assert [getattr(shards, name) for name in module.TERM_ROWS] == list(range(shards.N_TERMS))
    assert module.NORMALIZER_ROWS == {"MAX": shards.MAX, "LOG_SUM": shards.LOG_SUM}
    assert module.N_DIAGNOSTICS == native.N_DIAGNOSTICS


@built
@pytest.mark.parametrize("one_teacher", [True, False], ids=["one teacher", "anchored"])
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shard_stages_under_each_instruction_set(one_teacher, beta, dtype):
    """Shards cut inside blocks and vectors, one of them smaller than a vector, with -inf padding in
    the last shard, a masked row, and a confident student."""
    generator = torch.Generator().manual_seed(19)
    vocab = 1100
    student, partial, full = _rows(5, vocab, generator, dtype)
    for tensor in (student, partial, full):
        tensor[:, vocab - 40:] = -math.inf
    student[3, 700] += 40.0
    problem = Problem(student, partial, full, lam=0.9, clip=3.0, beta=beta, temperature=1.2,
                      mask=torch.tensor([True, True, False, True, True]), weights=None)
    check_sharded_against_gold("native", problem, [0, 3, 517, 1030, vocab], one_teacher)
