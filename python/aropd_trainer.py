"""AR-OPD inside transformers.Trainer: a compute_loss override and an EMA-teacher callback.

    python python/aropd_trainer.py --steps 10     (needs accelerate, which Trainer requires)

The same loop as train_tiny_aropd.py, handed to Trainer: rollouts are sampled inside compute_loss,
so the batches from the data collator hold prompts only. docs/integration.md walks through it.
"""

from __future__ import annotations

import argparse
import copy
import random

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import Trainer, TrainerCallback, TrainingArguments

from aropd_kernels import anchored_residual_kl
from train_tiny_aropd import (
    MAX_NEW_TOKENS,
    CharTokenizer,
    Problem,
    announce_pretraining,
    build_model,
    completion_logits,
    completion_loss_mask,
    cpu_backend,
    pretrain,
    sample_problems,
)


class AROPDTrainer(Trainer):
    """AR-OPD in Trainer.compute_loss: on-policy rollouts, three aligned views, one loss.

    Each batch holds B problems: "prompt_ids" and "prompt_mask" [B, P] (student prompts, left-padded),
    "partial_ids" and "full_ids" [B, L] (privileged prompts, right-padded) with their lengths
    "partial_lengths" and "full_lengths" [B]. Use TrainingArguments(remove_unused_columns=False).
    """

    def __init__(self, *args, teacher, pad_token_id: int, eos_token_id: int, lam=1.0, clip=5.0, beta=0.0,
                 max_new_tokens=256, backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)  # the EMA copy that EMATeacher updates
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.aropd = {"lam": lam, "clip": clip, "beta": beta, "backend": backend}
        self.max_new_tokens = max_new_tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        with torch.no_grad():  # 1. on-policy rollouts from the student
            sequences = self.accelerator.unwrap_model(model).generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0,
                max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
            )
        prompt_length = prompt_ids.shape[1]  # left padding: every student prompt ends at the same column
        completion = sequences[:, prompt_length:]
        mask = completion_loss_mask(completion, self.eos_token_id)  # skips the first 3 tokens and all after <eos>

        # 2. the student, with gradients; positions skip the left padding as in generate (absolute
        #    position embeddings need it; rotary ones see only relative positions)
        attention_mask = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits
        student = completion_logits(logits, prompt_length, completion.shape[1])

        # 3. the two teacher views: each privileged prompt followed by the same completion, no autograd
        with torch.no_grad():
            partial = self.score_view(inputs["partial_ids"], inputs["partial_lengths"], completion)
            full = self.score_view(inputs["full_ids"], inputs["full_lengths"], completion)

        # seq_mean divides by this micro-batch's rollouts; Trainer divides by the accumulation steps
        loss = anchored_residual_kl(student, partial, full, mask=mask, reduction="seq_mean", **self.aropd)
        return (loss, logits) if return_outputs else loss

    def score_view(self, prompt_ids, prompt_lengths, completion):
        """Teacher logits [B, C, V]: row b is its own prompt (prompt_lengths[b] tokens), then completion[b]."""
        rows = [torch.cat([ids[:n], tokens]) for ids, n, tokens in zip(prompt_ids, prompt_lengths.tolist(), completion)]
        input_ids = pad_sequence(rows, batch_first=True, padding_value=self.pad_token_id)
        attention_mask = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True)
        logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        return completion_logits(logits, prompt_lengths, completion.shape[1])


class EMATeacher(TrainerCallback):
    """teacher <- decay * teacher + (1 - decay) * student after every optimizer step."""

    def __init__(self, teacher, decay: float = 0.99):
        self.teacher, self.decay = teacher, decay

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        for teacher_param, student_param in zip(self.teacher.parameters(), model.parameters()):
            teacher_param.lerp_(student_param, 1.0 - self.decay)


def collate_views(tokenizer: CharTokenizer, problems: list[Problem]) -> dict[str, torch.Tensor]:
    """The batch AROPDTrainer expects, for the tiny addition task."""
    def encode(text: str) -> torch.Tensor:
        return torch.tensor([tokenizer.bos_id] + tokenizer.encode(text))

    prompts = [encode(p.student_prompt()) for p in problems]
    flipped = [prompt.flip(0) for prompt in prompts]  # left padding = right padding of the reversed rows
    batch = {
        "prompt_ids": pad_sequence(flipped, batch_first=True, padding_value=tokenizer.pad_id).flip(1),
        "prompt_mask": pad_sequence([torch.ones_like(p) for p in prompts], batch_first=True).flip(1),
    }
    for name, view in (("partial", Problem.partial_prompt), ("full", Problem.full_prompt)):
        ids = [encode(view(p)) for p in problems]
        batch[f"{name}_ids"] = pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_id)
        batch[f"{name}_lengths"] = torch.tensor([len(row) for row in ids])
    return batch


def main(argv=None) -> list[dict]:
    """Pre-trains the tiny student, then runs Trainer with AR-OPD; returns Trainer's log history."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="auto", choices=("auto", "native", "triton", "reference"))
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="aropd-trainer-output", help="Trainer's output_dir (nothing is saved)")
    args = parser.parse_args(argv)
    backend = cpu_backend(parser, args.backend)
    print(f"anchored_residual_kl backend: {backend} (--backend {args.backend})", flush=True)
    torch.set_num_threads(1)  # as in train_tiny_aropd.py: tiny matrices, shared cores
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = CharTokenizer()
    student = build_model(tokenizer)
    announce_pretraining(args.pretrain_steps)
    pretrain(student, tokenizer, rng, args.pretrain_steps, batch_size=64)
    teacher = copy.deepcopy(student)

    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=3e-4, lr_scheduler_type="constant", logging_steps=1,
        remove_unused_columns=False, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
    )
    trainer = AROPDTrainer(
        model=student, args=training_args, train_dataset=sample_problems(rng, 8 * 2 * args.steps),
        data_collator=lambda problems: collate_views(tokenizer, problems), callbacks=[EMATeacher(teacher)],
        teacher=teacher, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
        max_new_tokens=MAX_NEW_TOKENS, backend=backend,
    )
    trainer.train()
    return trainer.state.log_history


if __name__ == "__main__":
    main()
