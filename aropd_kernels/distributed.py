"""Vocabulary-parallel calls: each rank of a process group holds a contiguous shard of the vocabulary.

The only module that calls torch.distributed. A call runs the shard stages of
:mod:`aropd_kernels.shards` with an all-gather over the group as their ``gather``, after one
all-gather that checks the ranks agree. Every collective is an all-gather of O(N) numbers:

1. the agreement record (fixed size): each rank's N, V_r, dtypes, settings and fingerprints of its
   per-row tensors, and its own validation error if it has one, so that bad input on any rank raises
   the same error on every rank instead of leaving the others waiting in a collective;
2. the inputs' normalizers, ``[n_inputs, 2, N]``;
3. the target's sums, ``[N_TARGET_SUMS, N]``;
4. the mixture sums, ``[2, N]``, for the generalized JSD only.

The gradient needs no communication: each rank writes its own columns.

A fused-linear call whose lm_head weights are split along V (:func:`sharded_fused_linear`) agrees once,
then runs :func:`shard_rows` on each chunk's logits: collectives 2 to 4 for each chunk that has an
active row, each of O(chunk rows) numbers, and, when the hidden states' gradient is summed here, one
all-reduce of the chunk's ``[rows, H]`` float32 gradient.
"""

from __future__ import annotations

import functools
import importlib
from typing import Mapping, NamedTuple

import torch
import torch.distributed as dist

from . import functional, fused_linear, rows, shards
from .backends import RowResult

STAGES = ("shard_normalizers", "shard_target_sums", "shard_mixture_sums", "shard_gradient")

# What each rank says in the agreement record, as float64. The numbers after "vocab" must be equal on
# every rank; fields an entry point has no use for stay 0.
RECORD_FIELDS = (
    "error",  # 0: this rank's inputs are valid; else the ERROR_TYPES code of its validation error
    "vocab",  # V_r, this rank's vocabulary shard
    "rows",  # N
    "teachers",  # 1 or 2
    "student_dtype", "teacher_dtype", "full_dtype",  # index in rows.LOGIT_DTYPES; -1: absent
    "lam", "clip", "beta", "reduction", "diagnostics",
    "temperature", "active", "row_scale", "labels",  # fingerprints of the per-row tensors
    "logits_dtype", "logit_scale", "logit_softcap", "chunk_rows", "hidden_grad_reduced",  # fused linear only
)
ERROR_TYPES = (None, ValueError, TypeError, RuntimeError)  # RuntimeError: any other exception
MESSAGE_BYTES = 1024  # a rank's error message, UTF-8, truncated

_AGREEMENT_FIXES = {
    "rows": "each rank passes its vocabulary shard [..., V_r] of the same tokens [..., V]",
    "teachers": "every rank calls the same function (anchored_residual_kl or distillation_divergence)",
    "student_dtype": "every rank passes student_logits of one dtype",
    "teacher_dtype": "every rank passes teacher logits of one dtype",
    "full_dtype": "every rank passes full_teacher_logits of one dtype",
    "lam": "every rank passes the same lam", "clip": "every rank passes the same clip",
    "beta": "every rank passes the same beta", "reduction": "every rank passes the same reduction",
    "diagnostics": "every rank passes the same return_diagnostics",
    "temperature": "every rank passes the same temperature",
    "active": "every rank passes the same labels, ignore_index and mask",
    "row_scale": "every rank passes the same weights and num_items_in_batch",
    "labels": "every rank passes the same labels",
    "logits_dtype": "every rank passes the same logits_dtype, and hidden states, weights and biases of the same dtypes",
    "logit_scale": "every rank passes the same logit_scale",
    "logit_softcap": "every rank passes the same logit_softcap",
    "chunk_rows": "every rank passes the same chunk_size and backend (the chunks' collectives must pair up)",
    "hidden_grad_reduced": "every rank passes the same reduce_hidden_grad, and student_hidden requires grad on all "
                           "ranks or on none",
}


class VocabularyShards(NamedTuple):
    """How the vocabulary is split: this rank's place in the group and every rank's shard size."""

    group: dist.ProcessGroup
    rank: int  # in the group
    sizes: tuple[int, ...]  # V_r of every rank, in rank order

    @property
    def offset(self) -> int:
        """Index of this rank's first vocabulary entry in the whole vocabulary."""
        return sum(self.sizes[:self.rank])

    @property
    def vocab(self) -> int:
        """V, the whole vocabulary."""
        return sum(self.sizes)


def gather_over(group: dist.ProcessGroup, world_size: int):
    """The ``gather`` of :func:`aropd_kernels.shards.run_stages` over ``group``: one all-gather."""

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        stacked = tensor.new_empty((world_size, *tensor.shape))
        if tensor.numel():  # N = 0 on every rank (the agreement checked it): nothing to send
            dist.all_gather_single(stacked.view(-1), tensor.view(-1), group=group)
        return stacked

    return gather


def stage_module(backend: str):
    """The backend's module, which must provide the shard stages; ValueError naming the fix if not."""
    module = importlib.import_module(f"aropd_kernels.{backend}")
    missing = [stage for stage in STAGES if not hasattr(module, stage)]
    if missing:
        raise ValueError(
            f"backend={backend!r} cannot run on a vocabulary shard (it lacks {', '.join(missing)}); "
            "use backend='reference' or backend='auto' with process_group= or DTensor inputs."
        )
    return module


def shard_rows(shards_layout: VocabularyShards, backend: str, student, partial, full, row_temperature, active,
               grad_scale, grad_out, *, lam, clip, beta, with_diagnostics, labels=None) -> RowResult:
    """The per-row contract of :func:`aropd_kernels.backends.compute_rows` for this rank's vocabulary
    shard: the whole vocabulary's losses and diagnostics (equal on every rank), this shard's columns of
    the gradient. ``labels`` index the whole vocabulary. Every rank of the group calls it with the same
    rows and settings: it runs two collectives (three for the generalized JSD)."""
    local_labels = None if labels is None else labels - shards_layout.offset  # outside [0, V_r): not here
    return shards.run_stages(
        stage_module(backend), student, partial, full, row_temperature, active, grad_scale, grad_out,
        lam=lam, clip=clip, beta=beta, with_diagnostics=with_diagnostics, labels=local_labels,
        gather=gather_over(shards_layout.group, len(shards_layout.sizes)))


# --- the agreement --------------------------------------------------------------------------------

_PRIME = 2**31 - 1  # fingerprints are sums modulo this prime: exact in int64, in any order


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """int64 scalar: the bits of ``tensor``'s entries weighted by position, and its size, summed modulo
    2^31 - 1.

    Equal tensors give equal fingerprints on every device; different ones differ but by a chance of
    about 1 in 2^31. Exact integer arithmetic, so no rounding can tell equal tensors apart.
    """
    flat = tensor.reshape(-1)
    if flat.dtype == torch.float32:
        flat = flat.view(torch.int32)
    elif flat.dtype == torch.float64:
        flat = flat.view(torch.int64)
    values = flat.to(torch.int64).remainder(_PRIME)
    positions = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64)
    weights = (positions * 48271).remainder(_PRIME)  # distinct for every position below 2^31
    return ((values * weights).remainder(_PRIME).sum() + flat.numel()).remainder(_PRIME)


def _dtype_code(tensor: torch.Tensor | None) -> float:
    return -1.0 if tensor is None else float(rows.LOGIT_DTYPES.index(tensor.dtype))


def call_facts(call: functional.PreparedCall, reduction: str, labels) -> dict[str, torch.Tensor | float]:
    """The agreement record's fields for a validated call of the logits' entry points."""
    student, teacher, full = call.views
    lam, clip, beta, _ = call.settings
    return {
        "teachers": 1.0 if full is None else 2.0,
        "student_dtype": _dtype_code(student), "teacher_dtype": _dtype_code(teacher), "full_dtype": _dtype_code(full),
        **_shared_facts(call.plan, (lam, clip, beta), reduction, call.return_diagnostics, labels),
    }


def linear_call_facts(call, reduction: str, labels, reduce_hidden_grad: bool) -> dict[str, torch.Tensor | float]:
    """The agreement record's fields for a validated fused-linear call (a ``fused_linear.LinearCall``);
    the dtypes are those of the hidden states."""
    student_hidden, _, _, teacher_hidden, full_hidden, _, _ = call.tensors
    lam, clip, beta, _ = call.settings
    logit_scale, logit_softcap = call.projection
    hidden_grad = torch.is_grad_enabled() and student_hidden.requires_grad and reduce_hidden_grad
    return {
        "teachers": 1.0 if full_hidden is None else 2.0,
        "student_dtype": _dtype_code(student_hidden), "teacher_dtype": _dtype_code(teacher_hidden),
        "full_dtype": _dtype_code(full_hidden),
        **_shared_facts(call.plan, (lam, clip, beta), reduction, call.return_diagnostics, labels),
        "logits_dtype": float(rows.LOGIT_DTYPES.index(call.logits_dtype)),
        "logit_scale": logit_scale, "logit_softcap": 0.0 if logit_softcap is None else logit_softcap,
        "chunk_rows": float(call.chunk_rows), "hidden_grad_reduced": float(hidden_grad),
    }


def _shared_facts(plan: rows.RowPlan, divergence: tuple[float, float, float], reduction: str, diagnostics: bool,
                  labels) -> dict[str, torch.Tensor | float]:
    """The fields every entry point fills: N, the divergence's settings and the per-row tensors' fingerprints."""
    lam, clip, beta = divergence
    facts = {
        "rows": float(plan.active.numel()), "lam": lam, "clip": clip, "beta": beta,
        "reduction": float(rows.REDUCTIONS.index(reduction)), "diagnostics": float(diagnostics),
        "temperature": fingerprint(plan.row_temperature), "active": fingerprint(plan.active),
        "row_scale": fingerprint(plan.row_scale),
    }
    if labels is not None:
        flat = labels.to(device=plan.active.device, dtype=torch.int64).reshape(-1)
        facts["labels"] = fingerprint(torch.where(plan.active, flat, torch.full_like(flat, -1)))
    return facts


def _record_device(group: dist.ProcessGroup) -> torch.device:
    """Where the agreement record travels: the CPU where the group has gloo, else the current accelerator."""
    if "gloo" in str(dist.get_backend(group)):
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def _record(vocab: int, facts: Mapping[str, torch.Tensor | float] | None, error: BaseException | None,
            device: torch.device) -> torch.Tensor:
    """This rank's agreement record as bytes: the float64 fields, then its error message."""
    values = torch.zeros(len(RECORD_FIELDS), dtype=torch.float64)
    text = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    if error is not None:
        values[RECORD_FIELDS.index("error")] = _error_code(error)
        message = f"{type(error).__name__}: {error}".encode()[:MESSAGE_BYTES]
        text[:len(message)] = torch.tensor(list(message), dtype=torch.uint8)
    else:
        values[RECORD_FIELDS.index("vocab")] = vocab
        tensors = {name: value for name, value in facts.items() if isinstance(value, torch.Tensor)}
        if tensors:  # one transfer for every fingerprint
            for name, value in zip(tensors, torch.stack(list(tensors.values())).cpu().tolist()):
                values[RECORD_FIELDS.index(name)] = value
        for name, value in facts.items():
            if not isinstance(value, torch.Tensor):
                values[RECORD_FIELDS.index(name)] = value
    return torch.cat([values.view(torch.uint8), text]).to(device)


def _error_code(error: BaseException) -> int:
    """Index in ERROR_TYPES of the first type ``error`` is an instance of; RuntimeError's for any other."""
    for code, kind in enumerate(ERROR_TYPES[1:], start=1):
        if isinstance(error, kind):
            return code
    return ERROR_TYPES.index(RuntimeError)


def _decode(gathered: torch.Tensor) -> tuple[list[list[float]], list[str]]:
    gathered = gathered.cpu()
    field_bytes = 8 * len(RECORD_FIELDS)
    tables = [record[:field_bytes].clone().view(torch.float64).tolist() for record in gathered]
    messages = [bytes(record[field_bytes:].tolist()).rstrip(b"\0").decode(errors="replace") for record in gathered]
    return tables, messages


def agree(group: dist.ProcessGroup, vocab: int, facts: Mapping[str, torch.Tensor | float] | None,
          error: BaseException | None = None) -> VocabularyShards:
    """The first collective of a call: every rank's record, gathered; raises the same error on every rank
    when any rank's inputs were refused (``error``) or the ranks disagree.

    ``facts``: fields of :data:`RECORD_FIELDS` (numbers, or int64 scalar tensors such as
    :func:`fingerprint`), None when ``error`` is set. Returns every rank's vocabulary shard size.
    """
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    record = _record(vocab, facts, error, _record_device(group))
    gathered = record.new_empty((world_size, record.numel()))
    dist.all_gather_single(gathered.view(-1), record, group=group)
    tables, messages = _decode(gathered)
    refused = [r for r, table in enumerate(tables) if table[0] != 0]
    if refused:
        first = refused[0]
        others = f" (rank{'s' if len(refused) > 2 else ''} {', '.join(map(str, refused[1:]))} too)" \
            if len(refused) > 1 else ""
        failure = ERROR_TYPES[int(tables[first][0])](
            f"rank {first} of the vocabulary-parallel group refused its inputs{others}: {messages[first]}")
        raise failure from error
    for index in range(RECORD_FIELDS.index("rows"), len(RECORD_FIELDS)):
        values = [table[index] for table in tables]
        if any(value != values[0] for value in values):
            name = RECORD_FIELDS[index]
            shown = ", ".join(f"rank {r}: {_shown(name, v)}" for r, v in enumerate(values))
            raise ValueError(f"the ranks of the vocabulary-parallel group disagree on {name} ({shown}); "
                             f"{_AGREEMENT_FIXES[name]}.")
    return VocabularyShards(group, rank, tuple(int(table[1]) for table in tables))


def _shown(name: str, value: float) -> str:
    if name.endswith("_dtype"):
        return "absent" if value < 0 else str(rows.LOGIT_DTYPES[int(value)])
    if name == "reduction":
        return repr(rows.REDUCTIONS[int(value)])
    if name in ("temperature", "active", "row_scale", "labels"):
        return f"fingerprint {int(value)}"
    return f"{int(value)}" if value == int(value) else f"{value!r}"


# --- the entry point ----------------------------------------------------------------------------------

PER_TOKEN_KEYWORDS = ("labels", "mask", "weights", "temperature", "num_items_in_batch")


def _check_group(process_group) -> None:
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup (e.g. the tensor-parallel group), got "
            f"{type(process_group).__name__}."
        )


@torch.compiler.disable  # collectives and host-side checks: a graph break, the call runs eagerly
def sharded_divergence(tensors, names, process_group, **keywords):
    """``functional._divergence`` for a vocabulary split across ranks: (loss, Diagnostics or None)."""
    student_dtensor = tensors[0] if functional.is_dtensor(tensors[0]) else None
    if any(functional.is_dtensor(t) for t in tensors):
        tensors, process_group, keywords = _dtensor_locals(tensors, names, process_group, keywords)

    def prepare():
        if student_dtensor is not None:  # the local shard is never a leaf: check the DTensor itself
            rows.check_inplace(student_dtensor, keywords["inplace_grad"],
                               torch.is_grad_enabled() and student_dtensor.requires_grad)
        _check_shard_sizes(tensors, names)
        call = functional.prepare_call(tensors, names, **keywords, whole_vocabulary=False)
        call = call._replace(backend=_shard_backend(keywords["backend"], call.backend))
        return call, tensors[0].shape[-1], call_facts(call, keywords["reduction"], keywords["labels"])

    call, layout = _agreed_call(process_group, prepare)
    if student_dtensor is not None:
        _check_dtensor_layout(layout, student_dtensor.shape[-1])
    call = call._replace(plan=_whole_vocabulary_labels(call.plan, keywords["labels"], call.return_diagnostics, layout))
    loss, diagnostics = functional.run_call(call, functools.partial(shard_rows, layout))
    if student_dtensor is not None and call.inplace_grad and call.compute_grad:
        torch.autograd.graph.increment_version(student_dtensor)  # its shard's storage holds the gradient
    return loss, diagnostics


@torch.compiler.disable  # collectives and host-side checks: a graph break, the call runs eagerly
def sharded_fused_linear(student_hidden, student_weight, teacher_hiddens, teacher_weight, names, process_group,
                         reduce_hidden_grad: bool, **keywords):
    """``fused_linear._fused_linear`` for lm_head weights (and biases) split along the vocabulary across
    ranks, hidden states replicated: (loss, Diagnostics or None).

    Each chunk's rows run :func:`shard_rows` (two or three all-gathers of the chunk's rows); with
    ``reduce_hidden_grad`` each chunk's float32 hidden-state gradient is all-reduced (summed) over the
    group before it is rounded, else every rank keeps its own shard's part.
    """

    def prepare():
        call = fused_linear.prepare_call(student_hidden, student_weight, teacher_hiddens, teacher_weight, names,
                                         **keywords, whole_vocabulary=False)
        call = call._replace(backend=_shard_backend(keywords["backend"], call.backend))
        facts = linear_call_facts(call, keywords["reduction"], keywords["labels"], reduce_hidden_grad)
        return call, student_weight.shape[0], facts

    call, layout = _agreed_call(process_group, prepare)
    call = call._replace(plan=_whole_vocabulary_labels(call.plan, keywords["labels"], call.return_diagnostics, layout))
    reduce_hidden = sum_over(layout.group) if reduce_hidden_grad else None
    return fused_linear.run_call(call, functools.partial(shard_rows, layout), reduce_hidden)


def sum_over(group: dist.ProcessGroup):
    """In-place sum of a tensor over ``group``: one all-reduce."""

    def reduce(tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=group)

    return reduce


def _agreed_call(process_group, prepare):
    """Runs ``prepare()`` (returning the validated call, this rank's V_r and its agreement facts) and the
    agreement: the call and the vocabulary's layout, or the same error on every rank."""
    _check_group(process_group)
    call = facts = error = None
    vocab = 0
    try:
        call, vocab, facts = prepare()
    except Exception as refusal:  # noqa: BLE001 -- every rank must hear of it; agree raises it
        error = refusal
    return call, agree(process_group, vocab, facts, error)


def _whole_vocabulary_labels(plan: rows.RowPlan, labels, return_diagnostics: bool,
                             layout: VocabularyShards) -> rows.RowPlan:
    """The plan with the labels' rows when their log-probabilities are asked for, checked against the whole
    vocabulary (the ranks' labels agree: this raises on all of them or on none)."""
    if not return_diagnostics or labels is None:
        return plan
    return plan._replace(token_labels=rows.row_labels(labels, plan.active, layout.vocab, plan.active.device))


def _check_shard_sizes(tensors, names) -> None:
    """A rank's three logits must cover the same vocabulary shard (the rest is rows.check_logits')."""
    if not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in tensors):
        return
    for name, tensor in zip(names[1:], tensors[1:]):
        if tensor.shape[-1] != tensors[0].shape[-1]:
            raise ValueError(
                f"{name} holds {tensor.shape[-1]} vocabulary entries but {names[0]} holds {tensors[0].shape[-1]}; "
                "each rank passes the same vocabulary shard [..., V_r] of every logits tensor."
            )


def _shard_backend(requested: str, resolved: str) -> str:
    """``auto`` takes the backend it resolved to when that one runs on shards, else the reference."""
    try:
        stage_module(resolved)
    except ValueError:
        if requested != "auto":
            raise
        return "reference"
    return resolved


# --- DTensor inputs -----------------------------------------------------------------------------------


def _dtensor_locals(tensors, names, process_group, keywords):
    """The local shards of DTensor logits placed ``Shard(-1)`` on a 1-D mesh, the mesh's group, and the
    keywords with replicated DTensors made local. The same on every rank (placements are global), so a
    refusal here is raised by every rank before any collective.

    The student's local shard comes from ``to_local()``, so its gradient returns to the student as a
    DTensor with the student's placements.
    """
    from torch.distributed.tensor import DTensor, Shard

    mesh = None
    a_dtensor = next(name for name, tensor in zip(names, tensors) if isinstance(tensor, DTensor))
    for name, tensor in zip(names, tensors):
        if not isinstance(tensor, DTensor):
            raise TypeError(
                f"{a_dtensor} is a DTensor but {name} is not; pass every logits tensor as a DTensor on one "
                "mesh, or every one as this rank's local shard with process_group=."
            )
        if tensor.device_mesh.ndim != 1:
            raise ValueError(
                f"{name} lives on a {tensor.device_mesh.ndim}-D device mesh; the vocabulary split needs the "
                "tensor-parallel sub-mesh: pass the local shards (x.to_local()) with "
                "process_group=mesh.get_group('tp') (your tensor-parallel dimension's name)."
            )
        placement = tensor.placements[0]
        if not (type(placement) is Shard and placement.dim == tensor.dim() - 1):
            raise ValueError(f"{name} is a DTensor placed {placement!r}; {_placement_fix(placement, tensor.dim())}")
        if mesh is not None and tensor.device_mesh != mesh:
            raise ValueError(f"{name} lives on another device mesh than {names[0]}; put the logits on one mesh.")
        mesh = tensor.device_mesh
    group = mesh.get_group()
    if process_group is not None and process_group is not group:
        raise ValueError(
            "process_group differs from the DTensor logits' mesh group; drop process_group= (DTensor inputs "
            "bring their mesh's group)."
        )
    keywords = dict(keywords)
    for name in PER_TOKEN_KEYWORDS:
        value = keywords[name]
        if isinstance(value, DTensor):
            if not all(p.is_replicate() for p in value.placements):
                raise ValueError(
                    f"{name} is a DTensor placed {tuple(value.placements)}; per-token tensors hold every token "
                    f"on every rank: pass it placed Replicate() or as a plain tensor."
                )
            keywords[name] = value.to_local()
    return tuple(t.to_local() for t in tensors), group, keywords


def _check_dtensor_layout(layout: VocabularyShards, vocab: int) -> None:
    """DTensor splits a dimension as torch.chunk does (V = 1001 on 2 ranks: 501 and 500), and its
    operations, the gradient's accumulation included, assume those sizes."""
    chunk = -(-vocab // len(layout.sizes))
    expected = tuple(min(chunk, max(0, vocab - rank * chunk)) for rank in range(len(layout.sizes)))
    if layout.sizes != expected:
        raise ValueError(
            f"the DTensor logits' local shards have {list(layout.sizes)} vocabulary entries, but a DTensor of "
            f"V = {vocab} placed Shard(-1) has {list(expected)} (torch.chunk's split), which its operations "
            "assume; for another split pass the local shards as plain tensors with process_group=."
        )


def _placement_fix(placement, ndim: int) -> str:
    """What to do with logits placed otherwise than Shard(-1)."""
    if placement.is_replicate():
        return ("every rank holds the whole vocabulary: call without process_group on x.to_local(), or "
                "redistribute to [Shard(-1)] to split it.")
    if placement.is_partial():
        return "its entries are partial sums: x.redistribute(placements=[Shard(-1)]) first."
    return (f"the vocabulary is the last dimension ({ndim - 1}): x.redistribute(placements=[Shard(-1)]) "
            "first.")
