"""Everything multi-process, in one place. Launch with ``torchrun``; a plain ``python`` run is
a world of one. Nothing here runs at import."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


_TIMEOUT_S: float | None = None  # the process group's, for the messages below


def init(device: torch.device, timeout_s: float = 1800.0) -> Dist:
    """The process group, with a timeout on every collective (``dist.timeout_s``): a rank that
    never arrives (stuck, dead, out of data) ends the job instead of holding every GPU."""
    global _TIMEOUT_S
    from datetime import timedelta

    d = from_env()
    if d.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        _TIMEOUT_S = timeout_s
    return d


def explain(e: BaseException, d: Dist | None = None) -> str:
    """A distributed failure in one line naming this rank (and the timeout, when one ran out)."""
    d = d or from_env()
    text = " ".join(str(e).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    timed_out = any(w in text.lower() for w in ("timed out", "timeout", "time out"))
    why = (f"a collective got no answer from the other ranks within dist.timeout_s={_TIMEOUT_S:g} "
           f"s (a rank stuck, dead or out of data; see the other ranks' logs): "
           if timed_out and _TIMEOUT_S is not None else "")
    return f"rank {d.rank} of {d.world}: {why}{text}"


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        try:
            dist.barrier()
        except RuntimeError as e:
            raise RuntimeError(explain(e, d)) from e


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed gradient."""

    @staticmethod
    def forward(ctx, x):
        # every dimension is gathered: a rank without pairs holds (0, 1) label rows where the
        # others hold (N, n), and all_gather needs one shape
        shapes = [torch.zeros(x.dim(), dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
        dist.all_gather(shapes, torch.tensor(x.shape, dtype=torch.long, device=x.device))
        shapes = [tuple(int(v) for v in s) for s in shapes]
        full = tuple(max(s[i] for s in shapes) for i in range(x.dim()))
        padded = x.new_zeros(full)
        padded[tuple(slice(0, n) for n in x.shape)] = x
        out = [torch.zeros_like(padded) for _ in shapes]
        dist.all_gather(out, padded)
        sizes = [s[0] for s in shapes]
        if any(s[0] and s[1:] != full[1:] for s in shapes):
            raise ValueError(f"gathered SEA targets differ in shape across ranks: {shapes}")
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def gather_pairs(x: torch.Tensor, *targets: torch.Tensor):
    """SEA negatives from every rank: the visual tokens (gradients flow back to the owning
    rank) and their targets (words, or label ids and weights), in rank order."""
    return (_GatherWithGrad.apply(x), *(_GatherWithGrad.apply(t.detach()) for t in targets))


def mp_policy(device: torch.device):
    """FSDP2's mixed precision on a GPU: parameters gathered in bf16 (half the traffic of fp32
    gathers), gradients reduced in fp32 (torchtitan's default); the fp32 masters stay sharded.
    On CPU (gloo, tests) everything stays fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def llm_sharder(device: torch.device):
    """What ``trainer.llm.load_llm`` applies to the LLM built on the meta device: each decoder
    layer its own FSDP2 unit, and the input embedding and the output head too when they are
    not tied (a tied pair stays in the root unit: one parameter cannot live in two units).
    The rest (the final norm, a tied table) joins the root unit in ``wrap``."""
    from torch.distributed.fsdp import fully_shard

    mp = mp_policy(device)

    def shard(llm: torch.nn.Module) -> None:
        for layer in _decoder_layers(llm):
            fully_shard(layer, mp_policy=mp)
        embed, head = llm.get_input_embeddings(), llm.get_output_embeddings()
        if head is not None and head.weight is not embed.weight:
            fully_shard(embed, mp_policy=mp)
            fully_shard(head, mp_policy=mp)

    return shard


def wrap(task: torch.nn.Module, d: Dist, strategy: str, device: torch.device,
         find_unused: bool) -> torch.nn.Module:
    """DDP (replicated weights, gradients averaged) or FSDP2 (the LLM's units, sharded when it
    was loaded by ``llm_sharder``, and the root unit here: tower, adapter, temperature and the
    LLM's remaining parameters). A world of one gets the module itself."""
    if not d.enabled:
        return task
    if strategy == "fsdp":
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not isinstance(_decoder_layers(task.mllm.llm)[0], FSDPModule):
            llm_sharder(device)(task.mllm.llm)
        fully_shard(task, mp_policy=mp_policy(device))
        return task
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(task, device_ids=ids, find_unused_parameters=find_unused)


@contextlib.contextmanager
def unsharded(module: torch.nn.Module):
    """``module``'s full parameters for code that reads them outside its forward (SEA's label
    features read the embedding table); a no-op unless it is an FSDP2 unit of its own."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def _decoder_layers(llm) -> list[torch.nn.Module]:
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = llm
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise ValueError(f"cannot find the decoder layers of {type(llm).__name__} to shard")


def mean_over_ranks(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Each value averaged over the ranks (one tiny all-reduce): a step's loss is the global
    batch's, whatever the world size (rank 0 alone saw only its micro-batches)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / d.world).tolist()


def gather_objects(obj, d: Dist) -> list:
    """Every rank's ``obj`` (on every rank); [obj] for a world of one."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out
