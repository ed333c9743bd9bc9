"""A whole AR-OPD loop on CPU in under a minute: tiny transformers student, EMA self-teacher, no downloads.

    python python/train_tiny_aropd.py --steps 20 [--backend auto] [--lam 1.0] [--clip 5.0] [--beta 0.0] [--fused-linear]

The task is two-digit addition with a worked solution, e.g. ``47+38`` -> ``7+8=15;4+3+1=8;>85``.
A tiny Llama built from a config (character vocabulary, two layers) is pre-trained for a few seconds on
three prompt formats, then trained with anchored-residual on-policy distillation (AR-OPD):

- the student sees the question only:                    ``47+38=``
- the partial teacher sees the first half of the trace
  and the answer (the anchor):                           ``47+38[7+8=15;>85]=``
- the full teacher sees the whole trace:                 ``47+38[7+8=15;4+3+1=8;>85]=``

Each step samples rollouts from the student, scores the student's completion under both teacher views
(one EMA copy of the student, under ``torch.no_grad``), lines the three sets of logits up on the
completion tokens (:func:`completion_logits`, see docs/integration.md), and minimizes
``anchored_residual_kl(..., reduction="seq_mean")`` with the first completion tokens skipped, as the
paper does. The teacher then follows the student: teacher <- 0.99 * teacher + 0.01 * student.

With ``--fused-linear`` no logits are computed for the loss: the last hidden states of the student and
of both teacher views are lined up on the completion tokens instead (:func:`aligned_hidden_states`)
and handed with the two lm_head weights to ``fused_linear_anchored_residual_kl``.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from aropd_kernels import anchored_residual_kl, backends, fused_linear_anchored_residual_kl

SKIPPED_COMPLETION_TOKENS = 3  # the paper leaves the first completion tokens out of the loss
EMA_DECAY = 0.99  # teacher <- EMA_DECAY * teacher + (1 - EMA_DECAY) * student, after every step
MAX_NEW_TOKENS = 24  # the longest solution, "9+9=18;9+9+1=19;>198", is 20 characters plus <eos>
HELD_OUT_PROBLEMS = 128  # greedy accuracy on these is printed before and after AR-OPD


# --- tokenizer and task ---------------------------------------------------------------------------


class CharTokenizer:
    """One token per character of the task's alphabet, plus <pad>, <bos> and <eos>."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    ALPHABET = "0123456789+=;>[]"

    def __init__(self):
        self.vocab = list(self.SPECIALS) + list(self.ALPHABET)
        self.ids = {token: index for index, token in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = (self.ids[s] for s in self.SPECIALS)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.ids[character] for character in text]

    def decode(self, ids) -> str:
        """Text up to the first <eos>, without special tokens."""
        characters = []
        for index in ids:
            if index == self.eos_id:
                break
            if index >= len(self.SPECIALS):
                characters.append(self.vocab[index])
        return "".join(characters)


@dataclass(frozen=True)
class Problem:
    """a + b with two-digit operands (the column steps below pair the digits one to one)."""

    a: int
    b: int

    @property
    def question(self) -> str:
        return f"{self.a}+{self.b}"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def steps(self) -> list[str]:
        """Column additions from the ones digit up, e.g. 47+38 -> ["7+8=15;", "4+3+1=8;"]."""
        steps, carry = [], 0
        for digit_a, digit_b in zip(reversed(str(self.a)), reversed(str(self.b))):
            total = int(digit_a) + int(digit_b) + carry
            carried = f"+{carry}" if carry else ""
            steps.append(f"{digit_a}+{digit_b}{carried}={total};")
            carry = total // 10
        return steps

    @property
    def solution(self) -> str:
        return "".join(self.steps) + ">" + self.answer

    # The three views of AR-OPD. They end with the same "=" so the completion reads the same in each.
    def student_prompt(self) -> str:
        return f"{self.question}="

    def partial_prompt(self) -> str:
        first_half = "".join(self.steps[: len(self.steps) // 2])
        return f"{self.question}[{first_half}>{self.answer}]="

    def full_prompt(self) -> str:
        return f"{self.question}[{self.solution}]="


def sample_problems(rng: random.Random, count: int) -> list[Problem]:
    return [Problem(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(count)]


def answer_of(completion: str) -> str | None:
    """The answer a completion commits to (after the last '>'), or None when it gives none."""
    return completion.rsplit(">", 1)[1] if ">" in completion else None


# --- model and pre-training -----------------------------------------------------------------------


def build_model(tokenizer: CharTokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=96,
        pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def right_padded(rows: list[list[int]], pad_value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [pad_value] * (width - len(row)) for row in rows])


def pretrain(model, tokenizer: CharTokenizer, rng: random.Random, steps: int, batch_size: int) -> float:
    """Brief supervised training on all three views (loss on the solution only); returns the last loss.

    Seeing the privileged views here teaches the model to read a trace in its prompt, which is what
    lets the EMA copy of it act as a privileged teacher later.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    views = (Problem.student_prompt, Problem.partial_prompt, Problem.full_prompt)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        inputs, labels = [], []
        for problem in sample_problems(rng, batch_size):
            prompt = [tokenizer.bos_id] + tokenizer.encode(rng.choice(views)(problem))
            completion = tokenizer.encode(problem.solution) + [tokenizer.eos_id]
            inputs.append(prompt + completion)
            labels.append([-100] * len(prompt) + completion)
        input_ids = right_padded(inputs, tokenizer.pad_id)
        loss = model(
            input_ids=input_ids,
            attention_mask=(input_ids != tokenizer.pad_id).long(),
            labels=right_padded(labels, -100),
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


# --- logit alignment: the part that is easy to get wrong -------------------------------------------


def completion_logits(logits: torch.Tensor, prompt_lengths, completion_length: int) -> torch.Tensor:
    """The ``[B, C, V]`` rows of a causal LM's ``[B, L, V]`` logits that predict completion tokens.

    Row ``b`` of the input is ``prompt_b + completion + anything``; the logits at position ``t``
    predict token ``t + 1``, so completion token ``j`` is predicted at ``prompt_lengths[b] + j - 1``.
    ``prompt_lengths`` is an int (one prompt length for the whole batch, e.g. left-padded prompts:
    then the result is a view, no copy) or an integer tensor ``[B]`` (one per row, e.g. privileged
    contexts of different lengths followed by the same completion: then rows are gathered).
    """
    batch, length, _ = logits.shape
    if isinstance(prompt_lengths, int):
        prompt_lengths = torch.full((batch,), prompt_lengths)
    if prompt_lengths.shape != (batch,):
        raise ValueError(f"prompt_lengths must be an int or a [{batch}] tensor, got shape {tuple(prompt_lengths.shape)}.")
    shortest, longest = int(prompt_lengths.min()), int(prompt_lengths.max())
    if shortest < 1:
        raise ValueError("every prompt needs at least one token: the first completion token is predicted by the "
                         "last prompt token (start prompts with <bos>).")
    if longest + completion_length > length:
        raise ValueError(f"a prompt of {longest} tokens plus {completion_length} completion tokens does not fit in "
                         f"logits of length {length}; score prompt + completion in one forward pass.")
    if shortest == longest:
        return logits[:, shortest - 1 : shortest - 1 + completion_length]
    positions = prompt_lengths.to(logits.device)[:, None] - 1 + torch.arange(completion_length, device=logits.device)
    return logits[torch.arange(batch, device=logits.device)[:, None], positions]


# --- one AR-OPD step -------------------------------------------------------------------------------


@dataclass
class Rollouts:
    problems: list[Problem]
    prompt_length: int  # every student prompt has the same length (two-digit operands)
    sequences: torch.Tensor  # [B, prompt_length + C]: student prompt, then the sampled completion
    loss_mask: torch.Tensor  # bool [B, C]: completion tokens up to <eos>, less the first few

    @property
    def completion(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


def completion_loss_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True on tokens up to and including the first <eos>, except the first SKIPPED_COMPLETION_TOKENS."""
    is_eos = completion == eos_id
    before_or_at_eos = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    past_skipped = torch.arange(completion.shape[1]) >= SKIPPED_COMPLETION_TOKENS
    return before_or_at_eos & past_skipped


@torch.no_grad()
def generate(student, tokenizer: CharTokenizer, problems: list[Problem], sample: bool) -> tuple[torch.Tensor, int]:
    """(student prompt + completion ``[B, P + C]``, P). Prompts share one length: no padding needed."""
    prompts = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(p.student_prompt()) for p in problems])
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    generation = GenerationConfig(
        max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
        bos_token_id=tokenizer.bos_id, **sampling,
    )
    student.eval()
    sequences = student.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=generation)
    return sequences, prompts.shape[1]


def sample_rollouts(student, tokenizer: CharTokenizer, problems: list[Problem]) -> Rollouts:
    """On-policy rollouts: completions sampled from the student at temperature 1."""
    sequences, prompt_length = generate(student, tokenizer, problems, sample=True)
    loss_mask = completion_loss_mask(sequences[:, prompt_length:], tokenizer.eos_id)
    return Rollouts(problems, prompt_length, sequences, loss_mask)


def answer_accuracy(tokenizer: CharTokenizer, problems: list[Problem], completions: torch.Tensor) -> float:
    answers = [answer_of(tokenizer.decode(row)) for row in completions.tolist()]
    return sum(answer == p.answer for answer, p in zip(answers, problems)) / len(problems)


def greedy_accuracy(student, tokenizer: CharTokenizer, problems: list[Problem]) -> float:
    sequences, prompt_length = generate(student, tokenizer, problems, sample=False)
    return answer_accuracy(tokenizer, problems, sequences[:, prompt_length:])


def teacher_inputs(tokenizer: CharTokenizer, prompts: list[str], completion: torch.Tensor):
    """(input ids, attention mask, prompt lengths) of the student's completion after each privileged prompt."""
    prompt_ids = [[tokenizer.bos_id] + tokenizer.encode(prompt) for prompt in prompts]
    rows = [ids + tokens for ids, tokens in zip(prompt_ids, completion.tolist())]
    input_ids = right_padded(rows, tokenizer.pad_id)  # padding at the end never reaches earlier positions
    attention_mask = right_padded([[1] * len(row) for row in rows], 0)
    return input_ids, attention_mask, torch.tensor([len(ids) for ids in prompt_ids])


@torch.no_grad()
def teacher_logits(teacher, tokenizer: CharTokenizer, prompts: list[str], completion: torch.Tensor) -> torch.Tensor:
    """Teacher logits ``[B, C, V]`` for the student's completion placed after each privileged prompt."""
    input_ids, attention_mask, prompt_lengths = teacher_inputs(tokenizer, prompts, completion)
    teacher.eval()
    logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    return completion_logits(logits, prompt_lengths, completion.shape[1])


@torch.no_grad()
def teacher_hidden_states(teacher, tokenizer: CharTokenizer, prompts: list[str],
                          completion: torch.Tensor) -> torch.Tensor:
    """The teacher's last hidden states ``[B, C, H]`` at the rows whose logits would predict the completion:
    the base model without its lm_head (``get_decoder()``), so no logits are made."""
    input_ids, attention_mask, prompt_lengths = teacher_inputs(tokenizer, prompts, completion)
    teacher.eval()
    hidden = teacher.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return completion_logits(hidden, prompt_lengths, completion.shape[1])  # the same rows as for logits


def aligned_logits(student, teacher, tokenizer: CharTokenizer, rollouts: Rollouts):
    """Student, partial-teacher and full-teacher logits ``[B, C, V]``, row ``j`` predicting completion token ``j``.

    Only the student's logits carry autograd history; the teachers are scored under ``torch.no_grad``.
    """
    completion = rollouts.completion
    partial = teacher_logits(teacher, tokenizer, [p.partial_prompt() for p in rollouts.problems], completion)
    full = teacher_logits(teacher, tokenizer, [p.full_prompt() for p in rollouts.problems], completion)
    student.train()
    logits = student(input_ids=rollouts.sequences).logits
    return completion_logits(logits, rollouts.prompt_length, completion.shape[1]), partial, full


def aropd_loss(student, teacher, tokenizer: CharTokenizer, rollouts: Rollouts, *, lam: float, clip: float,
               beta: float, backend: str):
    """(loss, diagnostics) of one AR-OPD step; the loss carries the gradient to the student."""
    student_completion, partial, full = aligned_logits(student, teacher, tokenizer, rollouts)
    return anchored_residual_kl(
        student_completion, partial, full,
        lam=lam, clip=clip, beta=beta, mask=rollouts.loss_mask,
        reduction="seq_mean", return_diagnostics=True, backend=backend,
    )


def aligned_hidden_states(student, teacher, tokenizer: CharTokenizer, rollouts: Rollouts):
    """Last hidden states ``[B, C, H]`` of the student (with autograd history) and of both teacher views,
    row ``j`` at the position whose logits would predict completion token ``j``."""
    completion = rollouts.completion
    partial = teacher_hidden_states(teacher, tokenizer, [p.partial_prompt() for p in rollouts.problems], completion)
    full = teacher_hidden_states(teacher, tokenizer, [p.full_prompt() for p in rollouts.problems], completion)
    student.train()
    hidden = student.get_decoder()(input_ids=rollouts.sequences).last_hidden_state
    return completion_logits(hidden, rollouts.prompt_length, completion.shape[1]), partial, full


def fused_linear_aropd_loss(student, teacher, tokenizer: CharTokenizer, rollouts: Rollouts, *, lam: float,
                            clip: float, beta: float, backend: str):
    """:func:`aropd_loss` from hidden states and lm_head weights: the same loss, without the logits."""
    student_hidden, partial, full = aligned_hidden_states(student, teacher, tokenizer, rollouts)
    return fused_linear_anchored_residual_kl(
        student_hidden, student.get_output_embeddings().weight, partial, full,
        teacher.get_output_embeddings().weight,
        lam=lam, clip=clip, beta=beta, mask=rollouts.loss_mask,
        reduction="seq_mean", return_diagnostics=True, backend=backend,
    )


@torch.no_grad()
def ema_update(teacher, student, decay: float = EMA_DECAY) -> None:
    for teacher_param, student_param in zip(teacher.parameters(), student.parameters()):
        teacher_param.lerp_(student_param, 1.0 - decay)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return (values[mask].sum() / mask.sum().clamp(min=1)).item()


# --- driver ---------------------------------------------------------------------------------------


def cpu_backend(parser: argparse.ArgumentParser, requested: str) -> str:
    """The backend anchored_residual_kl runs for this example's CPU float32 logits (what ``auto``
    resolves to); a command-line error saying why when the requested one cannot run."""
    try:
        return backends.resolve(requested, torch.device("cpu"), (torch.float32,))
    except ValueError as error:
        parser.error(f"--backend {requested}: {error}")


def announce_pretraining(steps: int) -> None:
    print(f"pre-training the student for {steps} supervised steps on all three prompt formats, so that its "
          "EMA copy can read a privileged trace as a teacher (no output until it ends) ...", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="AR-OPD steps (default 20)")
    parser.add_argument("--backend", default="auto", choices=("auto", "native", "triton", "reference"),
                        help="anchored_residual_kl backend (default auto: the native kernel on CPU when built)")
    parser.add_argument("--lam", type=float, default=1.0, help="residual scale lambda (default 1.0)")
    parser.add_argument("--clip", type=float, default=5.0, help="residual clip c (default 5.0)")
    parser.add_argument("--beta", type=float, default=0.0,
                        help="divergence: 0 forward KL (the paper's scripts, default), 1 reverse KL, between JSD")
    parser.add_argument("--fused-linear", action="store_true",
                        help="compute the loss from the last hidden states and lm_head weights "
                             "(fused_linear_anchored_residual_kl), never the logits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="rollouts per AR-OPD step (default 16)")
    parser.add_argument("--lr", type=float, default=3e-4, help="AR-OPD learning rate (default 3e-4)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="supervised warm-up steps (default 300)")
    parser.add_argument("--pretrain-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the matrices are tiny, and on a shared machine "
                             "more threads spin-wait for each other and run several times slower)")
    args = parser.parse_args(argv)
    args.resolved_backend = cpu_backend(parser, args.backend)
    return args


def main(argv=None) -> list[dict]:
    """Runs the example; returns one dict per AR-OPD step (what the log line prints)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = CharTokenizer()
    student = build_model(tokenizer)

    print(f"anchored_residual_kl backend: {args.resolved_backend} (--backend {args.backend})", flush=True)
    start = time.perf_counter()
    announce_pretraining(args.pretrain_steps)
    pretrain_loss = pretrain(student, tokenizer, rng, args.pretrain_steps, args.pretrain_batch_size)
    print(f"pre-trained {args.pretrain_steps} steps in {time.perf_counter() - start:.1f}s, loss {pretrain_loss:.3f}")

    held_out = sample_problems(random.Random(f"held-out {args.seed}"), HELD_OUT_PROBLEMS)
    print(f"student greedy accuracy on {HELD_OUT_PROBLEMS} held-out problems: "
          f"{greedy_accuracy(student, tokenizer, held_out):.2f}")

    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    history = []
    for step in range(1, args.steps + 1):
        step_start = time.perf_counter()
        rollouts = sample_rollouts(student, tokenizer, sample_problems(rng, args.batch_size))
        loss_fn = fused_linear_aropd_loss if args.fused_linear else aropd_loss
        loss, diagnostics = loss_fn(student, teacher, tokenizer, rollouts, lam=args.lam, clip=args.clip,
                                    beta=args.beta, backend=args.resolved_backend)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update(teacher, student)

        mask = rollouts.loss_mask
        record = {
            "step": step,
            "loss": loss.item(),
            "belief_shift": masked_mean(diagnostics.belief_shift, mask),
            "clipped_mass": masked_mean(diagnostics.clipped_mass, mask),
            "student_entropy": masked_mean(diagnostics.student_entropy, mask),
            "target_entropy": masked_mean(diagnostics.target_entropy, mask),
            "accuracy": answer_accuracy(tokenizer, rollouts.problems, rollouts.completion),
            "tokens": int(mask.sum()),
            "seconds": time.perf_counter() - step_start,
        }
        history.append(record)
        print(
            f"step {step:3d}/{args.steps}  loss {record['loss']:.4f}  belief_shift {record['belief_shift']:.4f}  "
            f"clipped_mass {record['clipped_mass']:.4f}  H(student) {record['student_entropy']:.3f}  "
            f"H(target) {record['target_entropy']:.3f}  rollout_acc {record['accuracy']:.2f}  "
            f"tokens {record['tokens']}  {record['seconds']:.2f}s",
            flush=True,
        )
    print(f"student greedy accuracy after {args.steps} AR-OPD steps: {greedy_accuracy(student, tokenizer, held_out):.2f}")
    print(f"done: backend={args.resolved_backend}, {time.perf_counter() - start:.1f}s including pre-training")
    return history


if __name__ == "__main__":
    main()
