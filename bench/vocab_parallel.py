"""The vocab-parallel provider: the package's call with the vocabulary split over RANKS gloo ranks on CPU.

The benchmark's child process is rank 0: it holds the first ceil(V / RANKS) columns of the measured
inputs (its ``student_input`` is that shard, a leaf). On its first call it starts the other ranks, each
a process that makes the same inputs (bench.measure's seed) and keeps its own columns, and before every
call tells them over a pipe to make the same call, so that the ranks meet in the same collectives and
the loss is the single-process loss of those inputs. Each rank runs on cores / RANKS threads: together
the ranks use the cores that one single-process call uses. Times and peak memory are rank 0's; its time
includes waiting for the slowest rank at every collective.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from aropd_kernels import anchored_residual_kl
from bench.shapes import Shape

RANKS = 2
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def shard_width(vocab: int) -> int:
    """Columns of rank 0 (torch.chunk's split)."""
    return math.ceil(vocab / RANKS)


def first_shard(student: torch.Tensor) -> torch.Tensor:
    """Rank 0's columns of the student logits, as a leaf that requires grad (no copy)."""
    return student[..., :shard_width(student.shape[-1])].detach().requires_grad_(True)


def why_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return "the vocab-parallel provider runs its ranks on CPU with gloo (on GPUs it would be NCCL: not measured)"
    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no torch.distributed with gloo"
    return None


def _loss(settings, group):
    def loss(student, partial, full):
        return anchored_residual_kl(student, partial, full, lam=settings.lam, clip=settings.clip,
                                    beta=settings.beta, temperature=settings.temperature,
                                    reduction="batchmean", process_group=group)

    return loss


def _call(loss, student, partial, full, backward: bool):
    if not backward:
        with torch.no_grad():
            return (loss(student, partial, full),)
    value = loss(student, partial, full)
    return value, torch.autograd.grad(value, student)[0]


def _threads_per_rank() -> int:
    return max(1, (os.cpu_count() or 1) // RANKS)


def _other_rank(rank: int, port: int, shape, dtype: torch.dtype, settings, commands) -> None:
    """A rank besides 0: makes the call rank 0 announces, until rank 0's end of the pipe closes."""
    from bench.providers import logits_inputs  # the measured inputs; bench.providers imports this module

    torch.set_num_threads(_threads_per_rank())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS,
                            timeout=COLLECTIVE_TIMEOUT)
    width = shard_width(shape.vocab)
    columns = slice(rank * width, min(shape.vocab, (rank + 1) * width))
    student, partial, full = (x.detach()[..., columns].clone() for x in logits_inputs(shape, dtype, torch.device("cpu")))
    student.requires_grad_(True)
    loss = _loss(settings, dist.group.WORLD)
    try:
        while True:
            try:
                backward = commands.recv()
            except EOFError:
                break
            _call(loss, student, partial, full, backward)
    finally:
        dist.destroy_process_group()


def make(settings):
    """A step for rank 0; the first call starts the group."""
    state = {}

    def start(n_tokens: int, vocab: int, dtype: torch.dtype) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        context = multiprocessing.get_context("spawn")
        pipes = []
        for rank in range(1, RANKS):
            receiver, sender = context.Pipe(duplex=False)
            shape = Shape("", n_tokens, vocab)
            context.Process(target=_other_rank, args=(rank, port, shape, dtype, settings, receiver),
                            daemon=True).start()
            receiver.close()
            pipes.append(sender)
        torch.set_num_threads(_threads_per_rank())
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=RANKS,
                                timeout=COLLECTIVE_TIMEOUT)
        state.update(pipes=pipes, loss=_loss(settings, dist.group.WORLD))

    def step(student, partial, full, backward):
        if not state:
            start(student.shape[0], partial.shape[-1], student.dtype)
        for pipe in state["pipes"]:
            pipe.send(backward)
        columns = student.shape[-1]
        return _call(state["loss"], student, partial[..., :columns], full[..., :columns], backward)

    return step
