"""The trainer-facing example (python/train_tiny_aropd.py) and the op inside a compiled nn.Module.

- the example runs a few AR-OPD steps with a finite loss;
- its logit alignment puts the logits that predict completion token j at prompt_len + j - 1 in every view;
- on a real step of the loop, every backend matches the float64 gold, and each kernel backend's loss,
  diagnostics and parameter gradients match the reference's;
- a module calling AnchoredResidualKL compiles with torch.compile(fullgraph=True) and matches eager.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from aropd_kernels import AnchoredResidualKL, anchored_residual_kl, backends
from conftest import assert_loss_close, backends_under_test, device_for, gold
from strategies import Problem
from test_properties import check_against_gold

pytest.importorskip("transformers", reason="the example needs transformers: pip install -e '.[examples]'")

EXAMPLES = Path(__file__).resolve().parents[1] / "python"
LAM, CLIP, BETA = 1.0, 5.0, 0.0  # the example's defaults
KERNEL_BACKENDS = [name for name in backends_under_test() if name != "reference" and device_for(name).type == "cpu"]


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there, and aropd_trainer imports it
    spec.loader.exec_module(module)
    return module


example = _load_example("train_tiny_aropd")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One thread, as the example runs (its --threads default); the session's own count comes back after.

    The model is tiny, and on a shared two-core machine two spin-waiting threads run several times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_example_runs_steps_with_finite_loss(capsys):
    history = example.main(["--steps", "2", "--pretrain-steps", "20", "--pretrain-batch-size", "16",
                            "--batch-size", "4", "--seed", "1"])
    assert [record["step"] for record in history] == [1, 2]
    for record in history:
        assert record["tokens"] > 0
        for key in ("loss", "belief_shift", "clipped_mass", "student_entropy", "target_entropy"):
            assert math.isfinite(record[key]), f"{key} is not finite at step {record['step']}"
    printed = capsys.readouterr().out
    assert "step   2/2  loss" in printed and "belief_shift" in printed and "clipped_mass" in printed
    resolved = backends.resolve("auto", torch.device("cpu"), (torch.float32,))  # native or reference, never auto
    assert f"anchored_residual_kl backend: {resolved} (--backend auto)" in printed
    assert f"done: backend={resolved}," in printed
    assert printed.index("pre-training the student for 20 supervised steps") < printed.index("pre-trained 20 steps")


def test_example_runs_with_fused_linear(capsys):
    history = example.main(["--steps", "2", "--pretrain-steps", "20", "--pretrain-batch-size", "16",
                            "--batch-size", "4", "--seed", "1", "--fused-linear"])
    assert [record["step"] for record in history] == [1, 2]
    assert all(math.isfinite(record["loss"]) for record in history)


# --- alignment -------------------------------------------------------------------------------------


class NextTokenOracle(nn.Module):
    """A 'model' whose logits at position t put all their mass on input token t + 1 (the last on token 0)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids, attention_mask=None):
        next_tokens = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
        return SimpleNamespace(logits=10.0 * nn.functional.one_hot(next_tokens, self.vocab_size).float())


def test_completion_logits_predict_the_completion_in_every_view():
    tokenizer = example.CharTokenizer()
    oracle = NextTokenOracle(len(tokenizer))
    problems = [example.Problem(47, 38), example.Problem(10, 99), example.Problem(55, 55)]
    completions = [tokenizer.encode(p.solution) + [tokenizer.eos_id] for p in problems]
    completion = example.right_padded(completions, tokenizer.pad_id)

    # student view: one shared prompt length, prompt + completion in one row
    prompt = [[tokenizer.bos_id] + tokenizer.encode(p.student_prompt()) for p in problems]
    sequences = torch.tensor([ids + row for ids, row in zip(prompt, completion.tolist())])
    aligned = example.completion_logits(oracle(sequences).logits, len(prompt[0]), completion.shape[1])
    assert torch.equal(aligned.argmax(-1), completion)

    # teacher views: privileged prompts whose lengths differ from the student's and between rows
    for view in (example.Problem.partial_prompt, example.Problem.full_prompt):
        prompts = [view(p) for p in problems]
        assert len({len(text) for text in prompts}) > 1
        aligned = example.teacher_logits(oracle, tokenizer, prompts, completion)
        assert aligned.shape == (len(problems), completion.shape[1], len(tokenizer))
        assert torch.equal(aligned.argmax(-1), completion)


def test_completion_logits_with_one_prompt_length_is_a_view():
    logits = torch.randn(3, 10, 5)
    sliced = example.completion_logits(logits, 4, 6)
    assert sliced.data_ptr() == logits[:, 3].data_ptr(), "a shared prompt length needs no copy"
    gathered = example.completion_logits(logits, torch.tensor([4, 4, 4]), 6)
    assert torch.equal(sliced, gathered)
    per_row = example.completion_logits(logits, torch.tensor([1, 2, 4]), 6)
    for row, start in enumerate((0, 1, 3)):
        assert torch.equal(per_row[row], logits[row, start : start + 6])


@pytest.mark.parametrize(("prompt_lengths", "completion_length", "message"), [
    (0, 3, "at least one token"),
    (torch.tensor([2, 0, 1]), 3, "at least one token"),
    (5, 6, "does not fit"),
    (torch.tensor([2, 3]), 3, "prompt_lengths must be"),
])
def test_completion_logits_rejects_impossible_alignments(prompt_lengths, completion_length, message):
    with pytest.raises(ValueError, match=message):
        example.completion_logits(torch.zeros(3, 10, 5), prompt_lengths, completion_length)


def test_left_padded_prompts_need_position_ids():
    """Left-padded student prompts: the completion's logits match the unpadded row's when the positions
    skip the padding (what generate does, and what AROPDTrainer passes). A model with absolute position
    embeddings (GPT-2 here) shows why; rotary models (Llama) only see relative positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = example.CharTokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    model = GPT2LMHeadModel(config).eval()
    prompt = [tokenizer.bos_id] + tokenizer.encode("47+38=")
    completion = tokenizer.encode("7+8=15;4+3+1=8;>85")
    padding = 3
    padded = torch.tensor([[tokenizer.pad_id] * padding + prompt + completion])
    attention_mask = (torch.arange(padded.shape[1]) >= padding).long()[None]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        unpadded = model(input_ids=torch.tensor([prompt + completion])).logits
        with_positions = model(input_ids=padded, attention_mask=attention_mask, position_ids=position_ids).logits
        without_positions = model(input_ids=padded, attention_mask=attention_mask).logits
    expected = example.completion_logits(unpadded, len(prompt), len(completion))
    padded_prompt_length = padding + len(prompt)  # the shared prompt length of a left-padded batch
    aligned = example.completion_logits(with_positions, padded_prompt_length, len(completion))
    torch.testing.assert_close(aligned, expected, rtol=1e-5, atol=1e-5)
    shifted = example.completion_logits(without_positions, padded_prompt_length, len(completion))
    assert not torch.allclose(shifted, expected, rtol=1e-3, atol=1e-3)


def test_loss_mask_skips_the_first_tokens_and_everything_after_eos():
    eos, pad = 2, 0
    completion = torch.tensor([[5, 6, 7, 8, 9, eos, pad, pad], [5, eos, pad, pad, pad, pad, pad, pad]])
    mask = example.completion_loss_mask(completion, eos)
    assert example.SKIPPED_COMPLETION_TOKENS == 3
    assert mask.tolist() == [[False, False, False, True, True, True, False, False], [False] * 8]


def test_views_hold_the_privileged_context():
    problem = example.Problem(47, 38)
    assert problem.solution == "7+8=15;4+3+1=8;>85"
    assert problem.student_prompt() == "47+38="
    assert problem.partial_prompt() == "47+38[7+8=15;>85]="
    assert problem.full_prompt() == "47+38[7+8=15;4+3+1=8;>85]="


def test_trainer_override_runs_with_finite_loss(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[examples]'")
    trainer_example = _load_example("aropd_trainer")
    history = trainer_example.main(["--steps", "2", "--pretrain-steps", "10", "--output-dir", str(tmp_path)])
    losses = [record["loss"] for record in history if "loss" in record]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


# --- backends on a real step of the loop -----------------------------------------------------------


@pytest.fixture(scope="module")
def loop_step():
    """A briefly pre-trained student, its EMA teacher one step behind, and fresh rollouts."""
    torch.manual_seed(0)
    rng = random.Random(0)
    tokenizer = example.CharTokenizer()
    student = example.build_model(tokenizer)
    example.pretrain(student, tokenizer, rng, steps=15, batch_size=16)
    teacher = copy.deepcopy(student).requires_grad_(False)
    rollouts = example.sample_rollouts(student, tokenizer, example.sample_problems(rng, 6))
    assert rollouts.loss_mask.any()
    return student, teacher, tokenizer, rollouts


def _step(loop_step, backend: str):
    """Loss, diagnostics and student parameter gradients of one AR-OPD step with ``backend``."""
    student, teacher, tokenizer, rollouts = loop_step
    student.zero_grad(set_to_none=True)
    loss, diagnostics = example.aropd_loss(student, teacher, tokenizer, rollouts, lam=LAM, clip=CLIP, beta=BETA,
                                           backend=backend)
    loss.backward()
    grads = {name: param.grad.clone() for name, param in student.named_parameters()}
    return loss.detach(), diagnostics, grads


@pytest.mark.parametrize("backend", backends_under_test())
def test_loop_step_matches_float64_gold(loop_step, backend):
    student, teacher, tokenizer, rollouts = loop_step
    with torch.no_grad():
        student_logits, partial, full = example.aligned_logits(student, teacher, tokenizer, rollouts)
    mask = rollouts.loss_mask
    # per-token loss, diagnostics and gradient on the loop's own (sliced) logits
    check_against_gold(Problem(student_logits, partial, full, LAM, CLIP, BETA, 1.0, mask, None), backend)

    # the seq_mean loss the loop optimizes: mean over each rollout's scored tokens, then over the rollouts
    # that have one
    loss, _, _ = _step(loop_step, backend)
    vocab = student_logits.shape[-1]
    per_token = gold(student_logits.reshape(-1, vocab), partial.reshape(-1, vocab), full.reshape(-1, vocab),
                     lam=LAM, clip=CLIP, beta=BETA, temperature=1.0).loss.view(mask.shape)
    per_rollout = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    assert_loss_close(loss.reshape(1), per_rollout[mask.any(-1)].mean().reshape(1), "seq_mean loss")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS or [pytest.param("native", marks=pytest.mark.skip(
    reason="no kernel backend is built here (native needs the C++ extension; triton needs CUDA or "
           "TRITON_INTERPRET=1); backend='auto' is the reference itself, nothing to compare"))])
def test_loop_step_backend_matches_reference(loop_step, backend):
    loss, diagnostics, grads = _step(loop_step, backend)
    expected_loss, expected_diagnostics, expected_grads = _step(loop_step, "reference")
    assert_loss_close(loss.reshape(1), expected_loss.reshape(1).double(), "loss")
    for name, actual, expected in zip(diagnostics._fields, diagnostics, expected_diagnostics):
        if expected is None:  # a field that does not apply to this call
            assert actual is None, name
            continue
        assert_loss_close(actual, expected.double(), name)
    for name, expected in expected_grads.items():
        scale = expected.abs().max().item()
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-5 * scale, msg=f"grad of {name}")


@pytest.mark.parametrize("backend", backends_under_test())
def test_fused_linear_step_is_the_logits_step(loop_step, backend):
    """--fused-linear: the same loss, diagnostics and parameter gradients from hidden states and lm_head
    weights as from the aligned logits; the student's lm_head is tied to its embedding, which gets both
    gradients."""
    student, teacher, tokenizer, rollouts = loop_step
    with torch.no_grad():
        hidden, partial, full = example.aligned_hidden_states(student, teacher, tokenizer, rollouts)
        logits = example.aligned_logits(student, teacher, tokenizer, rollouts)
    torch.testing.assert_close(student.lm_head(hidden), logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher.lm_head(full), logits[2], rtol=1e-5, atol=1e-5)
    expected_loss, expected_diagnostics, expected_grads = _step(loop_step, backend)
    student.zero_grad(set_to_none=True)
    loss, diagnostics = example.fused_linear_aropd_loss(student, teacher, tokenizer, rollouts, lam=LAM, clip=CLIP,
                                                        beta=BETA, backend=backend)
    loss.backward()
    assert_loss_close(loss.detach().reshape(1), expected_loss.reshape(1).double(), "loss")
    for name, actual, expected in zip(diagnostics._fields, diagnostics, expected_diagnostics):
        if actual is None:  # the fused call is given no labels: no token log-probabilities
            assert name in ("student_token_logprob", "target_token_logprob"), name
            continue
        assert_loss_close(actual, expected.double(), name)
    for name, param in student.named_parameters():
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=f"grad of {name}")


# --- torch.compile ---------------------------------------------------------------------------------


class DistillationHead(nn.Module):
    """An lm-head followed by the AR-OPD loss: what a trainer's compiled loss region looks like."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.loss = AnchoredResidualKL(lam=0.8, clip=2.0, beta=0.0, reduction="seq_mean", return_diagnostics=True)

    def forward(self, hidden, partial_logits, full_logits, mask):
        return self.loss(self.lm_head(hidden), partial_logits, full_logits, mask=mask)


def test_module_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    batch, length, hidden_size, vocab = 2, 5, 16, 37
    module = DistillationHead(hidden_size, vocab)
    hidden = torch.randn(batch, length, hidden_size)
    partial, full = torch.randn(batch, length, vocab), torch.randn(batch, length, vocab)
    mask = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])

    def run(forward):
        module.zero_grad(set_to_none=True)
        hidden_input = hidden.clone().requires_grad_(True)
        loss, diagnostics = forward(hidden_input, partial, full, mask)
        loss.backward()
        return loss.detach(), diagnostics, module.lm_head.weight.grad.clone(), hidden_input.grad

    eager = run(module)
    compiled = run(torch.compile(module, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-7)
    for actual, expected in zip(compiled[1], eager[1]):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-5, atol=1e-7, msg="lm_head weight gradient")
    torch.testing.assert_close(compiled[3], eager[3], rtol=1e-5, atol=1e-7, msg="hidden-state gradient")
    # and the eager value is the functional one: the module only stores the arguments
    direct = anchored_residual_kl(module.lm_head(hidden), partial, full, lam=0.8, clip=2.0, beta=0.0,
                                  reduction="seq_mean", mask=mask)
    torch.testing.assert_close(eager[0], direct.detach())
