"""The Triton backend: interpreter checks on CPU (TRITON_INTERPRET=1, set by conftest without CUDA),
GPU checks at real vocabulary sizes when CUDA is present, the dispatch rule, and the AOT compile.

The hypothesis property suite of tests/test_properties.py also runs for ``triton`` whenever the
backend can run here; this file adds the cases a random draw rarely hits.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from aropd_kernels import anchored_residual_kl, backends
from conftest import assert_loss_close, backends_under_test, fixed_and_random, gold
from strategies import Problem, problems
from test_one_teacher import check_one_teacher_against_gold
from test_properties import check_against_gold

needs_triton = pytest.mark.skipif(
    "triton" not in backends_under_test(),
    reason="the Triton backend needs CUDA or TRITON_INTERPRET=1 (conftest sets it when CUDA is absent)",
)
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
NEG_INF = -math.inf


def _problem(vocab, rows=3, *, dtype=torch.float32, teacher_dtype=None, lam=1.0, clip=5.0, beta=1.0,
             temperature=1.0, mask=None, weights=None, seed=0, padding=0, scale=2.0) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    partial = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    full = partial + torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    if padding:
        for tensor in (student, partial, full):
            tensor[:, vocab - padding:] = NEG_INF
    teacher_dtype = teacher_dtype or dtype
    return Problem(student.to(dtype), partial.to(teacher_dtype), full.to(teacher_dtype),
                   lam, clip, beta, temperature, mask, weights)


# --- interpreter (or GPU) checks at small shapes ---------------------------------------------------


@needs_triton
@fixed_and_random(max_examples=6, problem=problems(max_rows=4, vocab_sizes=(1, 5, 256, 257, 2049)))
def test_triton_matches_gold_across_block_boundaries(problem):
    """V around the block sizes the launch heuristic picks (256 and 2048 lanes)."""
    check_against_gold(problem, "triton")


@needs_triton
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
def test_triton_row_longer_than_one_block(beta):
    """Several blocks per row with a partial last block and -inf padding at the end."""
    check_against_gold(_problem(4100, rows=2, beta=beta, padding=60, temperature=0.8), "triton")


@needs_triton
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
def test_triton_one_teacher_and_labels_over_several_blocks(beta):
    """One teacher over a row of two blocks of 2048 lanes and a partial third, with -inf padding at the
    end; labels in the first block, the last real token, the padding, and ignored."""
    problem = _problem(4200, rows=4, dtype=torch.bfloat16, teacher_dtype=torch.float32, beta=beta, padding=40,
                       temperature=torch.tensor([0.7, 1.0, 1.3, 2.0]))
    check_one_teacher_against_gold(problem, torch.tensor([5, 4159, 4180, -100]), "triton")


@needs_triton
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.3])
def test_triton_teacher_forbids_tokens(beta):
    """-inf conventions: the anchor bans a token (z = -inf), the full teacher bans another (residual
    -clip, or -inf with clip = inf), and padding is -inf in all three."""
    for clip in (2.0, math.inf):
        problem = _problem(300, rows=3, beta=beta, clip=clip, lam=0.7, padding=5)
        problem.partial[:, 3] = NEG_INF
        problem.full[:, 4] = NEG_INF
        check_against_gold(problem, "triton")


@needs_triton
def test_triton_lam_zero_ignores_full_teacher_bans():
    problem = _problem(64, rows=2, beta=0.0, lam=0.0, clip=math.inf)
    problem.full[:, 7] = NEG_INF  # residual -inf, times lam = 0 counts as 0
    check_against_gold(problem, "triton")


@needs_triton
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("nan_input", [0, 1, 2])
def test_triton_nan_propagates_to_its_row_only(beta, nan_input):
    """SPEC §5: a NaN in the student or either teacher reaches that row's loss, never hidden."""
    problem = _problem(300, rows=3, beta=beta)
    inputs = [problem.student, problem.partial, problem.full]
    inputs[nan_input][1, 10] = math.nan
    loss = anchored_residual_kl(*(tensor.to(DEVICE) for tensor in inputs), beta=beta, reduction="none",
                                backend="triton")
    assert torch.isnan(loss[1])
    assert torch.isfinite(loss[[0, 2]]).all()


@needs_triton
def test_triton_forward_kl_is_infinite_where_the_student_forbids_target_mass():
    problem = _problem(300, rows=2, beta=0.0)
    problem.student[:, 5] = NEG_INF
    loss = anchored_residual_kl(problem.student.to(DEVICE), problem.partial.to(DEVICE), problem.full.to(DEVICE),
                                beta=0.0, reduction="none", backend="triton")
    assert torch.equal(loss.cpu(), torch.full((2,), math.inf))


@needs_triton
def test_triton_inplace_grad_matches_separate_buffer():
    problem = _problem(777, rows=4, dtype=torch.bfloat16, teacher_dtype=torch.float32, beta=0.4,
                       temperature=torch.tensor([0.5, 1.0, 1.5, 2.0]))
    grads = []
    for inplace in (False, True):
        base = problem.student.to(DEVICE).clone().requires_grad_(True)
        logits = base * 1.0  # a non-leaf, as a model's logits are
        loss = anchored_residual_kl(logits, problem.partial.to(DEVICE), problem.full.to(DEVICE), beta=0.4,
                                    temperature=problem.temperature.to(DEVICE), inplace_grad=inplace,
                                    backend="triton")
        loss.backward()
        grads.append(base.grad)
    assert torch.equal(grads[0], grads[1])


@needs_triton
def test_triton_skipped_rows_and_diagnostics():
    mask = torch.tensor([True, False, True, False])
    problem = _problem(513, rows=4, beta=1.0, mask=mask, weights=torch.tensor([1.0, 2.0, 0.5, 1.0]))
    check_against_gold(problem, "triton")


def test_float32_to_bfloat16_rounds_like_torch():
    """The interpreter fix rounds to nearest even, as torch and the GPU's cvt.rn.bf16.f32 do."""
    pytest.importorskip("triton")
    from interpreter_rounding import float32_to_bfloat16_bits

    values = torch.cat([torch.randn(10000) * 100, torch.tensor([math.inf, -math.inf, 0.0, -0.0, 3.4e38, 1e-40])])
    expected = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(float32_to_bfloat16_bits(values.numpy()), expected)
    quiet_and_low_payload_nan = np.array([0x7FC00000, 0x7F800001], dtype=np.uint32).view(np.float32)
    nan_bits = float32_to_bfloat16_bits(quiet_and_low_payload_nan)
    assert torch.isnan(torch.from_numpy(nan_bits.view(np.int16)).view(torch.bfloat16)).all()


_BFLOAT16_STORE_MISMATCHES = """
import torch, triton, triton.language as tl

@triton.jit
def store_as_bfloat16(source, target, n: tl.constexpr):
    offsets = tl.arange(0, n)
    tl.store(target + offsets, tl.load(source + offsets).to(tl.bfloat16))

values = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 100
stored = torch.empty(4096, dtype=torch.bfloat16)
store_as_bfloat16[(1,)](values, stored, 4096)
print(int((stored != values.to(torch.bfloat16)).sum()), "of 4096 stores differ from torch's rounding")
"""


def _interpreted_bfloat16_store_mismatches(prelude: str) -> int:
    """Run a one-line kernel that stores float32 as bfloat16 in a fresh interpreted process."""
    result = subprocess.run([sys.executable, "-c", prelude + _BFLOAT16_STORE_MISMATCHES],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=os.path.dirname(__file__),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[0])


@needs_triton
def test_interpreter_rounds_bfloat16_like_the_gpu_once_the_tests_patch_it():
    """The package changes no third-party library: importing it leaves Triton's interpreter truncating
    float32 -> bfloat16; the tests' patch (installed by conftest) makes it round to nearest even."""
    assert _interpreted_bfloat16_store_mismatches("import aropd_kernels, aropd_kernels.triton\n") > 0
    patched = "import conftest, aropd_kernels.triton\n"
    assert _interpreted_bfloat16_store_mismatches(patched) == 0


def _run_without_interpreter(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter without TRITON_INTERPRET (conftest set it for this one)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_triton_on_cpu_without_interpreter_raises():
    """backend='triton' on CPU tensors is an error unless TRITON_INTERPRET=1 (SPEC §3)."""
    pytest.importorskip("triton")
    result = _run_without_interpreter(
        "import torch, aropd_kernels\n"
        "x = torch.randn(2, 5)\n"
        "try:\n"
        "    aropd_kernels.anchored_residual_kl(x, x, x, backend='triton')\n"
        "except ValueError as error:\n"
        "    assert 'TRITON_INTERPRET=1' in str(error) and 'CUDA' in str(error), error\n"
        "else:\n"
        "    raise SystemExit('no ValueError')\n"
    )
    assert result.returncode == 0, result.stderr + result.stdout


def test_compile_report_compiles_the_widest_specializations_without_spills():
    """Ahead-of-time compile for sm_90 needs no GPU; CI runs the full report for sm_80 and sm_90. The
    widest block of the fused kernel (anchored and one teacher) and of the float64 shard sums."""
    pytest.importorskip("triton")
    result = _run_without_interpreter(
        "from aropd_kernels.triton.compile_report import Specialization, compile_one\n"
        "for kernel, teachers in (('rows', 2), ('rows', 1), ('target_sums', 2)):\n"
        "    spec = Specialization(90, kernel, teachers, 'reverse_kl', True, kernel == 'rows', 'bf16', 'bf16', 2048, 8)\n"
        "    report = compile_one(spec)\n"
        "    assert report.error is None, report.error\n"
        "    assert report.spill_bytes == 0, report\n"
        "    assert 0 < report.registers <= 255, report\n"
    )
    assert result.returncode == 0, result.stderr + result.stdout


def test_compile_report_refuses_the_interpreter():
    pytest.importorskip("triton")
    from aropd_kernels.triton import compile_report

    if not backends._triton_interpreter_enabled():
        pytest.skip("TRITON_INTERPRET is off in this run (CUDA present)")
    with pytest.raises(SystemExit) as error:
        compile_report.main(["--arch", "90"])
    assert error.value.code == 2


# --- GPU: real vocabulary sizes, dtypes, in-place gradient, per-token temperature, 64-bit offsets ---


@cuda
@needs_cuda
@pytest.mark.parametrize("vocab", [128256, 152064, 262208])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
def test_gpu_large_vocabulary(vocab, dtype, beta):
    temperature = torch.tensor([0.7, 1.0, 1.3, 2.0])
    problem = _problem(vocab, rows=4, dtype=dtype, teacher_dtype=torch.float32 if dtype != torch.float32 else None,
                       beta=beta, temperature=temperature, padding=64, mask=torch.tensor([True, True, False, True]),
                       seed=vocab)
    check_against_gold(problem, "triton")


@cuda
@needs_cuda
def test_gpu_auto_backend_is_triton():
    assert backends.resolve("auto", torch.device("cuda"), (torch.bfloat16,)) == "triton"


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_inplace_grad_large_vocabulary(dtype):
    problem = _problem(152064, rows=8, dtype=dtype, beta=1.0, temperature=torch.linspace(0.6, 1.6, 8))
    grads = []
    for inplace in (False, True):
        base = problem.student.cuda().requires_grad_(True)
        loss = anchored_residual_kl(base * 1.0, problem.partial.cuda(), problem.full.cuda(),
                                    temperature=problem.temperature.cuda(), inplace_grad=inplace)
        loss.backward()
        grads.append(base.grad)
    assert torch.equal(grads[0], grads[1])


@cuda
@needs_cuda
def test_gpu_more_than_two_to_the_31_elements():
    """N·V >= 2^31: rows past the 32-bit offset limit match the gold (64-bit row offsets)."""
    vocab = 262208
    rows = (2**31 + vocab - 1) // vocab + 2
    needed = rows * vocab * 2 * 4 + (1 << 30)  # three bf16 inputs and the bf16 gradient
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB free on the GPU, {free / 2**30:.1f} GiB free")
    generator = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_(True)
    partial = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=generator)
    full = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=generator)
    with torch.no_grad():
        loss, diagnostics = anchored_residual_kl(student, partial, full, reduction="none", return_diagnostics=True)
    anchored_residual_kl(student, partial, full, reduction="sum").backward()  # the gradient is handed over as is
    checked = torch.tensor([0, rows - 2, rows - 1])  # the last rows start beyond 2^31 elements
    assert int(checked[-2]) * vocab >= 2**31
    expected = gold(student.detach()[checked].cpu(), partial[checked].cpu(), full[checked].cpu(),
                    lam=1.0, clip=5.0, beta=1.0, temperature=1.0)
    assert_loss_close(loss[checked], expected.loss, "per-token loss")
    assert_loss_close(diagnostics.target_entropy[checked], expected.diagnostics[3], "target_entropy")
    grad = student.grad[checked].double().cpu()
    assert (grad - expected.grad).abs().max() <= 2 ** -7 * expected.grad.abs().max()  # bf16 rounding
