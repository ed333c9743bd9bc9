"""TRL's GKDTrainer with aropd_kernels' loss: the drop-in, run for a few steps on CPU.

    python python/trl_gkd_dropin.py --steps 4     (needs trl: pip install -e '.[trl]')

A GKDTrainer subclass whose static method generalized_jsd_loss is aropd_kernels'. Everything is
built here, nothing is downloaded: a character tokenizer with a chat template, a dataset of additions
in chat form, and two small Llama models from a config (student and teacher). It first holds the
kernels' loss and parameter gradients against TRL's own on one batch, then trains: on-policy steps
(the student's own completions) and steps on the dataset's answers, mixed by GKD's lmbda.
docs/integration.md explains the drop-in.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import tempfile

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from aropd_kernels.integrations.trl import generalized_jsd_loss  # noqa: E402


class KernelGKDTrainer(GKDTrainer):
    """GKDTrainer whose loss runs on aropd_kernels: the whole drop-in is this one line."""

    generalized_jsd_loss = staticmethod(generalized_jsd_loss)


SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
CHARACTERS = "0123456789+=ua:\n"
# user turn "u:47+38\n", assistant turn "a:85<eos>\n"; the generation prompt is "a:"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'][0] }}:{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}<eos>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus the special tokens; built in memory."""
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("<eos>|."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_dataset(rng: random.Random, count: int) -> Dataset:
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        rows.append({"messages": [{"role": "user", "content": f"{a}+{b}"},
                                  {"role": "assistant", "content": str(a + b)}]})
    return Dataset.from_list(rows)


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A two-layer Llama from a config; a wide initialization so that student and teacher disagree."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config)


def loss_and_gradients(trainer: GKDTrainer, batch: dict, loss_fn) -> tuple[float, list[torch.Tensor]]:
    """GKDTrainer.compute_loss on ``batch`` with ``loss_fn`` as its generalized_jsd_loss."""
    trainer.generalized_jsd_loss = loss_fn  # an instance attribute: this trainer only, not bound to it
    try:
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
    finally:
        del trainer.generalized_jsd_loss
    return loss.item(), [parameter.grad.clone() for parameter in trainer.model.parameters()]


def compare_with_trl(trainer: KernelGKDTrainer, kernel_loss_fn) -> dict:
    """The first batch's loss and student gradients, from TRL's function and from the kernels'."""
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss, trl_grads = loss_and_gradients(trainer, batch, GKDTrainer.generalized_jsd_loss)
    kernel_loss, kernel_grads = loss_and_gradients(trainer, batch, kernel_loss_fn)
    grad_difference = max((a - b).abs().max().item() for a, b in zip(trl_grads, kernel_grads))
    grad_scale = max(g.abs().max().item() for g in trl_grads)
    trainer.model.zero_grad(set_to_none=True)
    return {"trl_loss": trl_loss, "kernel_loss": kernel_loss, "relative_grad_difference": grad_difference / grad_scale}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps (default 4)")
    parser.add_argument("--backend", default="auto", choices=("auto", "native", "triton", "reference"),
                        help="aropd_kernels backend (default auto: the native kernel on CPU when built)")
    parser.add_argument("--inplace-grad", action="store_true",
                        help="let the student gradient overwrite the logits (TRL's compute_loss does not read "
                             "them after the loss)")
    parser.add_argument("--beta", type=float, default=0.5, help="GKD's beta: 0 forward KL, 1 reverse KL (default 0.5)")
    parser.add_argument("--lmbda", type=float, default=0.5,
                        help="GKD's share of on-policy steps, completions sampled from the student (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="Trainer's output_dir (default: a temporary folder; "
                                                           "nothing is saved)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices on shared cores
    rng = random.Random(args.seed)
    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        config = GKDConfig(
            output_dir=args.output_dir or scratch, max_steps=args.steps, per_device_train_batch_size=4,
            learning_rate=1e-3, lmbda=args.lmbda, beta=args.beta, max_new_tokens=6, max_length=32,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True,
        )
        trainer = KernelGKDTrainer(
            model=build_model(tokenizer, args.seed), teacher_model=build_model(tokenizer, args.seed + 1),
            args=config, train_dataset=build_dataset(rng, 4 * args.steps), processing_class=tokenizer,
        )
        loss_fn = functools.partial(generalized_jsd_loss, backend=args.backend, inplace_grad=args.inplace_grad)
        comparison = compare_with_trl(trainer, loss_fn)
        if (args.backend, args.inplace_grad) != ("auto", False):  # this trainer only; the class keeps the defaults
            trainer.generalized_jsd_loss = loss_fn
        print(f"one batch: loss TRL {comparison['trl_loss']:.6f}, aropd_kernels {comparison['kernel_loss']:.6f}; "
              f"largest student-gradient difference {comparison['relative_grad_difference']:.1e} of the largest entry")
        trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    print("training losses: " + ", ".join(f"{loss:.4f}" for loss in losses))
    return {**comparison, "losses": losses}


if __name__ == "__main__":
    main()
