"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a directory: DCP's files hold the tensors (model state and the fused embedding
optimizer's state, each rank writing its own shards), and ``meta.pt`` holds the rest of what
Lightning saves (loop progress, callbacks, hyper-parameters, the dense optimizers, which are the
same on every rank). It is written into a side directory and renamed into place only when every
rank has finished, so a crash mid-write leaves the last good checkpoint as it was. DCP reshards on
load, so a checkpoint written by N processes loads into M.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.tensor import DTensor

__all__ = [
    "META_FILE",
    "consolidate_checkpoint",
    "copy_full_into_sharded",
    "is_sharded_checkpoint",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
]

META_FILE = "meta.pt"
_PARTIAL = ".partial"
_REPLACED = ".replaced"


def is_sharded_checkpoint(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a directory this module wrote."""
    return (Path(path) / META_FILE).is_file() and (Path(path) / ".metadata").is_file()


def save_sharded_checkpoint(
    path: Union[str, Path],
    tensors: dict[str, Any],
    meta: dict[str, Any],
    is_global_zero: bool,
    barrier: Callable[[], None],
) -> None:
    """Write ``tensors`` with DCP from every rank and ``meta`` from rank 0, atomically.

    Every rank must call this. The new checkpoint goes to ``<path>.partial`` and replaces ``path``
    only after all ranks are done; an old checkpoint at ``path`` is removed last.
    """
    path = Path(path)
    partial = path.with_name(path.name + _PARTIAL)
    if is_global_zero:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    dcp.save(tensors, checkpoint_id=partial)
    if is_global_zero:
        torch.save(meta, partial / META_FILE)
    barrier()
    if is_global_zero:
        replaced = path.with_name(path.name + _REPLACED)
        if path.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            path.rename(replaced)
        partial.rename(path)
        shutil.rmtree(replaced, ignore_errors=True)
    barrier()


def load_sharded_checkpoint(path: Union[str, Path], tensors: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint into ``tensors`` in place (resharding as needed); returns its ``meta``."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a sharded checkpoint directory (no {META_FILE} or DCP .metadata in it); "
            "HybridParallelStrategy writes and reads checkpoints as directories"
        )
    dcp.load(tensors, checkpoint_id=path)
    return torch.load(path / META_FILE, map_location="cpu", weights_only=False)


def consolidate_checkpoint(path: Union[str, Path], output: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """Turn a sharded checkpoint into one plain Lightning checkpoint the un-sharded module loads.

    Full tables are assembled in this process's memory, so run it on a machine that holds the
    whole model. With ``output`` the result is also written with ``torch.save``, ready for
    ``MyModule.load_from_checkpoint(output)``.

    Example::

        ckpt = consolidate_checkpoint("checkpoints/last.ckpt", "last-full.ckpt")
        model = MyModule.load_from_checkpoint("last-full.ckpt")
    """
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint directory")
    with tempfile.TemporaryDirectory() as tmp:
        flat = Path(tmp) / "full.pt"
        dcp_to_torch_save(path, flat)
        tensors = torch.load(flat, map_location="cpu", weights_only=False)
    checkpoint = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = tensors["state_dict"]
    checkpoint.pop("optimizer_states", None)
    checkpoint.pop("lr_schedulers", None)
    if output is not None:
        torch.save(checkpoint, output)
    return checkpoint


@torch.no_grad()
def copy_full_into_sharded(sharded_state: dict[str, Any], full_state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the local shards of a sharded state dict, in place.

    ``sharded_state`` comes from a sharded module's ``state_dict()`` (its tensors are views of the
    live weights); each rank copies the slices it holds. Keys missing from ``full_state`` are left
    alone.
    """
    for key, target in sharded_state.items():
        source = full_state.get(key)
        if source is None:
            continue
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                index = tuple(
                    slice(offset, offset + size)
                    for offset, size in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
                )
                shard.tensor.copy_(source[index])
        elif isinstance(target, DTensor):
            local = target.to_local()
            _, offsets = _dtensor_local_offsets(target)
            index = tuple(slice(o, o + s) for o, s in zip(offsets, local.shape))
            local.copy_(source[index])
        elif isinstance(target, torch.Tensor):
            target.copy_(source)


def _dtensor_local_offsets(tensor: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(shape), tuple(offsets)



def gather_full_state_dict(state: dict[str, Any], is_global_zero: bool) -> dict[str, torch.Tensor]:
    """Assemble full tensors from a sharded state dict on rank 0 (every rank must call it).

    Other ranks get an empty dict. Meant for small models and hand-offs (e.g. back to the process
    that launched training); for real checkpoints use `save_sharded_checkpoint`.
    """
    full: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            # NCCL gathers into device memory; gloo into host memory.
            device = _collective_device(value)
            out = torch.empty(value.size(), dtype=value.dtype, device=device) if is_global_zero else None
            value.gather(dst=0, out=out)
            tensor = out
        elif isinstance(value, DTensor):
            tensor = value.full_tensor()
        else:
            tensor = value
        if is_global_zero and tensor is not None:
            full[key] = tensor.detach().cpu()
    return full


def _collective_device(tensor: ShardedTensor) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
