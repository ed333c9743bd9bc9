"""The AR-OPD loss with the vocabulary split across ranks, as a tensor-parallel lm_head produces it.

    torchrun --nproc-per-node 2 python/vocab_parallel_demo.py            (CPU, gloo; any number of ranks)
    torchrun --nproc-per-node 2 python/vocab_parallel_demo.py --dtensor  (the same logits as DTensors)

Every rank builds the same tiny problem from one seed: hidden states of a student and of the teacher's
two views, and lm_head weights [V, H]. Each rank keeps the rows of the weights for its contiguous
vocabulary shard (a column-parallel linear, as Megatron-LM lays it out; V need not divide evenly), so
its logits are [B, T, V_r]. The loss runs with process_group=; the lm_head's weight gradient is the
rank's own shard, and the hidden states' gradient is the sum of every rank's part (all-reduced here,
where Megatron's column-parallel layer does it in its backward). Rank 0 then computes the same loss in
one process over the whole vocabulary and prints both; every rank checks its gradients against it.
Exits with status 1 when anything differs beyond float32 rounding.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from aropd_kernels import anchored_residual_kl


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=5003, help="vocabulary size V (default: 5003)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size H (default: 64)")
    parser.add_argument("--batch", type=int, default=2, help="sequences B (default: 2)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per sequence T (default: 16)")
    parser.add_argument("--beta", type=float, default=1.0, help="1 reverse KL (default), 0 forward KL, between JSD")
    parser.add_argument("--dtensor", action="store_true", help="pass the logits as DTensors placed Shard(-1)")
    return parser.parse_args(argv)


def vocabulary_shard(vocab: int, rank: int, world_size: int, dtensor: bool) -> slice:
    """This rank's contiguous columns: torch.chunk's split for DTensor, Megatron's (the remainder spread
    over the first ranks) otherwise."""
    if dtensor:
        chunk = -(-vocab // world_size)
        return slice(min(vocab, rank * chunk), min(vocab, (rank + 1) * chunk))
    base, extra = divmod(vocab, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def make_problem(args):
    """Hidden states and lm_head weights, the same on every rank (one seed)."""
    generator = torch.Generator().manual_seed(0)
    hidden = [torch.randn(args.batch, args.tokens, args.hidden, generator=generator) for _ in range(3)]
    student_weight = torch.randn(args.vocab, args.hidden, generator=generator) * 0.3
    teacher_weight = torch.randn(args.vocab, args.hidden, generator=generator) * 0.3
    mask = torch.rand(args.batch, args.tokens, generator=generator) > 0.2  # e.g. the completion tokens
    return hidden, student_weight, teacher_weight, mask


def loss_over(student_hidden, weight, partial_logits, full_logits, mask, args, **parallel):
    logits = student_hidden @ weight.T
    if "mesh" in parallel:
        from torch.distributed.tensor import DTensor, Shard

        def as_dtensor(local):  # the global shape is given: the shards may differ in size
            whole = torch.empty(*local.shape[:-1], args.vocab, device="meta")
            return DTensor.from_local(local, parallel["mesh"], [Shard(-1)], run_check=False, shape=whole.shape,
                                      stride=whole.stride())

        logits, partial_logits, full_logits = (as_dtensor(x) for x in (logits, partial_logits, full_logits))
        parallel = {}
    return anchored_residual_kl(logits, partial_logits, full_logits, beta=args.beta, mask=mask,
                                reduction="seq_mean", **parallel)


def main(argv=None) -> int:
    args = parse_args(argv)
    dist.init_process_group("gloo")  # torchrun sets the rendezvous variables; NCCL on GPUs
    rank, world_size = dist.get_rank(), dist.get_world_size()
    (student_hidden, partial_hidden, full_hidden), student_weight, teacher_weight, mask = make_problem(args)
    columns = vocabulary_shard(args.vocab, rank, world_size, args.dtensor)

    # each rank: its lm_head shard, its logits shard, the loss over the whole vocabulary
    weight_shard = student_weight[columns].clone().requires_grad_(True)
    hidden = student_hidden.clone().requires_grad_(True)
    with torch.no_grad():
        teacher_shard = teacher_weight[columns]
        partial_logits, full_logits = partial_hidden @ teacher_shard.T, full_hidden @ teacher_shard.T
    if args.dtensor:
        from torch.distributed.device_mesh import init_device_mesh

        parallel = {"mesh": init_device_mesh("cpu", (world_size,))}
    else:
        parallel = {"process_group": dist.group.WORLD}
    loss = loss_over(hidden, weight_shard, partial_logits, full_logits, mask, args, **parallel)
    loss.backward()
    dist.all_reduce(hidden.grad)  # each rank's logits saw only its shard: the hidden gradient is the sum

    # one process, the whole vocabulary
    whole_weight = student_weight.clone().requires_grad_(True)
    whole_hidden = student_hidden.clone().requires_grad_(True)
    with torch.no_grad():
        whole_partial, whole_full = partial_hidden @ teacher_weight.T, full_hidden @ teacher_weight.T
    expected = loss_over(whole_hidden, whole_weight, whole_partial, whole_full, mask, args)
    expected.backward()

    errors = torch.tensor([
        (loss - expected).abs().item(),
        (weight_shard.grad - whole_weight.grad[columns]).abs().max().item(),
        (hidden.grad - whole_hidden.grad).abs().max().item(),
    ])
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    scale = torch.tensor([expected.abs().item(), whole_weight.grad.abs().max().item(),
                          whole_hidden.grad.abs().max().item()])
    agree = bool((errors <= 1e-5 * scale + 1e-6).all())
    if rank == 0:
        path = "DTensor logits placed Shard(-1)" if args.dtensor else "process_group="
        print(f"{world_size} ranks, V = {args.vocab}, N = {args.batch * args.tokens} tokens, {path}")
        print(f"vocab-parallel loss {loss.item():.6f}   single process {expected.item():.6f}   "
              f"|difference| {errors[0].item():.1e}")
        print(f"largest |difference| of the lm_head weight gradient {errors[1].item():.1e}, "
              f"of the hidden-state gradient {errors[2].item():.1e}")
        print("match" if agree else "MISMATCH")
    dist.destroy_process_group()
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
