"""The distributed helpers of SNRAdamW: rank-local views of FSDP2 DTensors, their shard group, all-reduce.

Imports only torch (DTensor support is optional, so older torch builds still import the package).
"""

from __future__ import annotations

import torch

try:  # DTensor (FSDP2) support; optional so that older torch builds still import us.
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Shard
except Exception:  # pragma: no cover
    DTensor = None
    Shard = None

__all__ = ["DTensor", "local", "shard_group", "all_reduce", "any_dtensor"]


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (FSDP2 shard); the tensor itself otherwise."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def any_dtensor(tensors) -> bool:
    """Whether any of these tensors is a DTensor (False without DTensor support)."""
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def shard_group(p: torch.Tensor):
    """The process group over which a DTensor parameter is sharded, or None if it is not."""
    if DTensor is None or not isinstance(p, DTensor):
        return None
    if not any(isinstance(pl, Shard) for pl in p.placements):
        return None
    mesh = p.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"SNRAdamW cannot infer the shard group of a DTensor on a {mesh.ndim}-D device mesh; "
            "pass process_group= (the group whose ranks hold disjoint shards)"
        )
    return mesh.get_group()


def all_reduce(tensor: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """All-reduce over ``group`` on the device its backend needs (gloo: CPU), back on the tensor's device."""
    import torch.distributed as dist

    if dist.get_backend(group) == "gloo" or not torch.cuda.is_available():
        comm = torch.device("cpu")
    else:
        comm = torch.device("cuda", torch.cuda.current_device())
    out = tensor.to(comm)
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return out.to(tensor.device)
