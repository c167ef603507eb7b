"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written so none is ever half there.

A checkpoint ``P`` is an atomically written directory (`lightning_dembed._atomic`): a symbolic
link to a complete version directory, ``.P.versions/<id>``, beside it. A version holds DCP's files
(model state and the fused embedding optimizer's state, each rank writing its own shards) and
``meta.pt``, the rest of what Lightning saves (loop progress, callbacks, hyper-parameters, the
dense optimizers, which are the same on every rank). A save:

1. rank 0 removes versions no link points to (what a crashed save left) and creates a new one;
2. every rank writes its shards into it with DCP (files fsync'd; DCP writes ``.metadata`` last);
3. rank 0 writes ``meta.pt``, fsyncs the version, then points ``P`` at it with one atomic rename
   of a fresh link over ``P`` (directory fsync'd), then removes the old version.

Until the rename, ``P`` is the last good checkpoint; after it, the new one. An error on rank 0 is
raised on every rank (no rank waits in a barrier for the timeout). DCP reshards on load, so a
checkpoint written by N processes loads into M.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Optional, TypeVar, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, TensorStorageMetadata
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from lightning_dembed import _atomic
from lightning_dembed._private import (
    EmptyStateDictLoadPlanner,
    compute_local_shape_and_global_offset,
    load_state_dict_no_dist,
)

__all__ = [
    "META_FILE",
    "CheckpointError",
    "consolidate_checkpoint",
    "copy_full_into_sharded",
    "gather_full_state_dict",
    "is_sharded_checkpoint",
    "local_tensors",
    "load_sharded_checkpoint",
    "load_sharded_tensors",
    "read_sharded_checkpoint",
    "refuse_mismatched_keys",
    "reshaped_tensors",
    "saved_keys",
    "saved_only_entries",
    "set_extra_states",
    "unsaved_tensors",
    "mark_for_assignment",
    "remove_sharded_checkpoint",
    "save_sharded_checkpoint",
]

META_FILE = "meta.pt"
_DCP_METADATA = ".metadata"

T = TypeVar("T")
Broadcast = Callable[[Any, int], Any]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file at fault."""


def is_sharded_checkpoint(path: Union[str, Path]) -> bool:
    """Whether ``path`` is (or links to) a complete checkpoint directory this module wrote."""
    return (Path(path) / META_FILE).is_file() and (Path(path) / _DCP_METADATA).is_file()


def _on_rank_zero(step: Callable[[], T], is_global_zero: bool, broadcast: Broadcast) -> T:
    """Run ``step`` on rank 0 and hand its result to every rank, or raise its error on every rank."""
    result: Any = None
    error: Optional[str] = None
    failure: Optional[BaseException] = None
    if is_global_zero:
        try:
            result = step()
        except (OSError, pickle.PicklingError, RuntimeError, TypeError, ValueError) as err:  # re-raised below
            failure, error = err, f"{type(err).__name__}: {err}"
    result, error = broadcast((result, error), 0)
    if failure is not None:
        raise failure
    if error is not None:
        raise CheckpointError(f"saving the checkpoint failed on rank 0: {error}")
    return result


def _write_meta(version: Path, meta: dict[str, Any]) -> None:
    torch.save(meta, version / META_FILE)


def _commit(path: Path, version: Path, meta: dict[str, Any]) -> None:
    _write_meta(version, meta)
    _atomic.publish(path, version)


def save_sharded_checkpoint(
    path: Union[str, Path],
    tensors: dict[str, Any],
    meta: dict[str, Any],
    is_global_zero: bool,
    broadcast: Broadcast,
) -> None:
    """Write ``tensors`` with DCP from every rank and ``meta`` from rank 0, atomically.

    Every rank must call this, with ``broadcast(obj, src)`` the strategy's object broadcast.
    """
    path = Path(path)
    version = Path(_on_rank_zero(lambda: str(_atomic.new_version(path)), is_global_zero, broadcast))
    # A tensor every rank holds (the dense part) is written from rank 0, as under strategy="ddp"; by
    # default DCP picks any rank, and per-rank buffers (BatchNorm's statistics) would differ.
    planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
    dcp.save(tensors, checkpoint_id=version, planner=planner)  # raises on every rank if any rank fails
    _on_rank_zero(lambda: _commit(path, version, meta), is_global_zero, broadcast)


def remove_sharded_checkpoint(path: Union[str, Path]) -> None:
    """Remove a checkpoint and its versions (call on one rank)."""
    _atomic.remove(path)


SavedItems = dict[tuple[str, ...], Optional[torch.Tensor]]
"""What a checkpoint holds, by the path of keys DCP flattened (``("state_dict", "<parameter>")``):
each tensor's full size and dtype as a tensor on the meta device, None for other objects."""


def _check_files(path: Path) -> SavedItems:
    """Name a missing or truncated file before DCP fails on it with a message that does not; returns
    what the checkpoint holds."""
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a sharded checkpoint directory (no {META_FILE} or DCP {_DCP_METADATA} in it); "
            "HybridParallelStrategy writes and reads checkpoints as directories"
        )
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except (EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path / _DCP_METADATA} is truncated or corrupt ({err})") from err
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: shard file {file} is missing")
        if file.stat().st_size < size:
            raise CheckpointError(
                f"checkpoint {path}: shard file {file} is truncated ({file.stat().st_size} of {size} bytes)"
            )
    key_paths = metadata.planner_data or {}  # DefaultSavePlanner's: flattened key -> path of keys
    return {
        tuple(key_paths.get(key, (key,))): torch.empty(item.size, dtype=item.properties.dtype, device="meta")
        if isinstance(item, TensorStorageMetadata) else None
        for key, item in metadata.state_dict_metadata.items()
    }


def _load_meta(path: Path, weights_only: Optional[bool]) -> dict[str, Any]:
    try:
        return torch.load(path / META_FILE, map_location="cpu", weights_only=weights_only)
    except (EOFError, RuntimeError) as err:
        raise CheckpointError(f"{path / META_FILE} is truncated or corrupt ({err})") from err


def read_sharded_checkpoint(
    path: Union[str, Path], weights_only: Optional[bool] = None
) -> tuple[dict[str, Any], SavedItems]:
    """A checkpoint's ``meta`` and what it holds (`SavedItems`), its files checked first.

    ``weights_only`` is passed to ``torch.load`` for ``meta.pt``, as Lightning does for a
    checkpoint file.
    """
    path = Path(path)
    saved = _check_files(path)
    return _load_meta(path, weights_only), saved


def load_sharded_checkpoint(
    path: Union[str, Path], tensors: dict[str, Any], weights_only: Optional[bool] = None
) -> dict[str, Any]:
    """Load a checkpoint into ``tensors`` in place (resharding as needed); returns its ``meta``."""
    meta, _ = read_sharded_checkpoint(path, weights_only)
    load_sharded_tensors(path, tensors)
    return meta


def load_sharded_tensors(path: Union[str, Path], tensors: dict[str, Any]) -> None:
    """Load the tensors of a checkpoint already checked by `read_sharded_checkpoint` into ``tensors`` in place."""
    dcp.load(tensors, checkpoint_id=path)


def _tensor_leaves(
    tensors: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], torch.Tensor]]:
    for key, value in tensors.items():
        if isinstance(value, Mapping):
            yield from _tensor_leaves(value, (*prefix, key))
        elif isinstance(value, torch.Tensor):
            yield (*prefix, key), value


def reshaped_tensors(
    tensors: Mapping[str, Any], saved: SavedItems
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """The tensors in ``tensors`` (nested dicts) whose full size differs from the one the checkpoint
    saved (``saved`` from `read_sharded_checkpoint`), by dotted key: ``(saved, here)``."""
    return {
        ".".join(key): (tuple(saved[key].size()), tuple(value.size()))
        for key, value in _tensor_leaves(tensors)
        if saved.get(key) is not None and saved[key].size() != value.size()
    }


def unsaved_tensors(tensors: Mapping[str, Any], saved: SavedItems) -> list[str]:
    """The tensors in ``tensors`` (nested dicts) that the checkpoint does not hold, by dotted key."""
    return [".".join(key) for key, _ in _tensor_leaves(tensors) if key not in saved]


def saved_keys(saved: SavedItems) -> set[str]:
    """The keys of the checkpoint's ``state_dict`` (its first level)."""
    return {key[1] for key in saved if len(key) > 1 and key[0] == "state_dict"}


def saved_only_entries(saved: SavedItems, present: Collection[str]) -> dict[str, Any]:
    """Places to load what the checkpoint's ``state_dict`` holds and ``present`` lacks, nested as saved:
    empty full tensors (CPU, the saved size and dtype), and None for other objects.

    DCP loads only the keys it is given a place for; a load that must hand over what the module does
    not have (for ``on_load_checkpoint`` to rename or drop) gives it these, loaded in full on every
    rank as a ``torch.load`` of a whole file would be.
    """
    entries: dict[str, Any] = {}
    for key, meta in saved.items():
        if len(key) < 2 or key[0] != "state_dict" or key[1] in present:
            continue
        node = entries
        for part in key[1:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = None if meta is None else torch.empty_like(meta, device="cpu")
    return entries


def refuse_mismatched_keys(
    module_name: str, missing: Iterable[str], unexpected: Iterable[str], source: Union[str, Path, None] = None
) -> None:
    """Raise as ``Module.load_state_dict(strict=True)`` does when the keys of a state dict and a module differ."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    if not missing and not unexpected:
        return
    lines = [f"Error(s) in loading state_dict for {module_name}" + (f" from {source}" if source else "") + ":"]
    if missing:
        lines.append("Missing key(s) in state_dict: " + ", ".join(f'"{key}"' for key in missing) + ".")
    if unexpected:
        lines.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{key}"' for key in unexpected) + ".")
    lines.append("Set strict_loading = False on the LightningModule to load the keys both have.")
    raise RuntimeError("\n\t".join(lines))


def mark_for_assignment(state: dict[str, torch.Tensor], keys: Iterable[str]) -> OrderedDict:
    """``state`` as an OrderedDict whose modules owning ``keys`` load by assignment.

    ``Module.load_state_dict`` copies into existing parameters, which does nothing for tables built
    on the meta device (and ``.to()`` then fails with "Cannot copy out of meta tensor"). Modules
    marked here take the loaded tensors as their parameters instead (``assign=True``, recorded in
    the state dict's ``_metadata`` as ``torch.save`` keeps it), so ``load_from_checkpoint`` works.
    """
    marked = OrderedDict(state)
    metadata = dict(getattr(state, "_metadata", {}) or {})
    for key in keys:
        module = key.rpartition(".")[0]
        metadata[module] = {**metadata.get(module, {}), "assign_to_params_buffers": True}
    marked._metadata = metadata  # type: ignore[attr-defined]
    return marked


def consolidate_checkpoint(path: Union[str, Path], output: Optional[Union[str, Path]] = None) -> dict[str, Any]:
    """Turn a sharded checkpoint into one plain Lightning checkpoint the un-sharded module loads.

    Only the model state is read (not the tables' fused optimizer state; the dense optimizers' and
    LR schedulers' states are kept for a warm start), and full tables are assembled
    in this process's memory, so run it on a machine that holds the whole model. With ``output``
    the result is also written with ``torch.save``, ready for ``MyModule.load_from_checkpoint``,
    also when the module builds its tables on the meta device.

    Example::

        ckpt = consolidate_checkpoint("checkpoints/last.ckpt", "last-full.ckpt")
        model = MyModule.load_from_checkpoint("last-full.ckpt")
    """
    path = Path(path)
    _check_files(path)
    checkpoint = _load_meta(path, weights_only=False)
    tensors: dict[str, Any] = {}
    load_state_dict_no_dist(
        tensors,
        storage_reader=dcp.FileSystemReader(str(path)),
        planner=EmptyStateDictLoadPlanner(keys={"state_dict"}),
        no_dist=True,
    )
    checkpoint["state_dict"] = mark_for_assignment(
        tensors["state_dict"], checkpoint.get("lightning_dembed", {}).get("table_keys", [])
    )
    if output is not None:
        torch.save(checkpoint, output)
    return checkpoint


@torch.no_grad()
def copy_full_into_sharded(sharded_state: dict[str, Any], full_state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the local shards of a sharded state dict, in place.

    ``sharded_state`` comes from a sharded module's ``state_dict()`` (its tensors are views of the
    live weights); each rank copies the slices it holds. Keys missing from ``full_state`` are left
    alone; a tensor of another full size is refused as ``Module.load_state_dict`` refuses it.
    """
    for key, target in sharded_state.items():
        source = full_state.get(key)
        if source is None or _same_local_tensors(target, source):
            continue  # loaded in place already (DCP loads into the module's own state dict)
        if isinstance(source, (ShardedTensor, DTensor)):
            raise TypeError(
                f"{key}: a sharded tensor other than the one loaded; give a full tensor to load into the shards"
            )
        if isinstance(target, torch.Tensor) and isinstance(source, torch.Tensor) and source.shape != target.shape:
            raise RuntimeError(
                f"size mismatch for {key}: copying a param with shape {source.shape} from checkpoint, the shape "
                f"in current model is {target.shape}."
            )
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                index = tuple(
                    slice(offset, offset + size)
                    for offset, size in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
                )
                shard.tensor.copy_(source[index])
        elif isinstance(target, DTensor):
            local = target.to_local()
            _, offsets = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
            index = tuple(slice(o, o + s) for o, s in zip(offsets, local.shape))
            local.copy_(source[index])
        elif isinstance(target, torch.Tensor):
            target.copy_(source)


def set_extra_states(module: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Hand each submodule that defines ``set_extra_state`` its value in ``state``, as
    ``Module.load_state_dict`` does (``copy_full_into_sharded`` copies tensors only)."""
    for name, submodule in module.named_modules():
        key = f"{name}._extra_state" if name else "_extra_state"  # Module.state_dict's name for it
        if key in state and type(submodule).set_extra_state is not torch.nn.Module.set_extra_state:
            submodule.set_extra_state(state[key])


def local_tensors(value: Any) -> list[torch.Tensor]:
    """This rank's tensors of ``value``: a sharded tensor's local shards, a DTensor's local part, or itself."""
    if isinstance(value, ShardedTensor):
        return [shard.tensor for shard in value.local_shards()]
    if isinstance(value, DTensor):
        return [value.to_local()]
    return [value] if isinstance(value, torch.Tensor) else []


def _same_local_tensors(target: Any, source: Any) -> bool:
    """Whether ``source`` holds this rank's part of ``target`` in the very same memory."""
    if source is target:
        return True
    mine, theirs = local_tensors(target), local_tensors(source)
    return bool(mine) and len(mine) == len(theirs) and all(
        a.data_ptr() == b.data_ptr() and a.shape == b.shape for a, b in zip(mine, theirs)
    )


def gather_full_state_dict(
    state: dict[str, Any], is_global_zero: bool, table_keys: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """Assemble full tensors from a sharded state dict on rank 0 (every rank must call it).

    Other ranks get an empty dict. Meant for small models and hand-offs (e.g. back to the process
    that launched training); for real checkpoints use `save_sharded_checkpoint`. ``table_keys``
    load by assignment (`mark_for_assignment`).
    """
    full: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            # NCCL gathers into device memory; gloo into host memory.
            device = _collective_device()
            out = torch.empty(value.size(), dtype=value.dtype, device=device) if is_global_zero else None
            value.gather(dst=0, out=out)
            tensor = out
        elif isinstance(value, DTensor):
            tensor = value.full_tensor()
        else:
            tensor = value
        if is_global_zero and tensor is not None:
            full[key] = tensor.detach().cpu()
    return mark_for_assignment(full, [k for k in table_keys if k in full])


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
