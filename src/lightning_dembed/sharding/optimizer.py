"""The optimizer the embedding tables train with: FBGEMM's fused, in-backward kernels.

Sharded tables are updated inside the backward pass by FBGEMM (no gradient for a table is ever
materialised), so the optimizer ``configure_optimizers`` returns is translated into its fused
equivalent and attached to the tables before sharding, where TorchRec picks it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from torchrec import optim as trec_optim
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer


__all__ = [
    "EmbeddingOptimizer",
    "ParamGroupRef",
    "TableHyperParameters",
    "apply_embedding_optimizers",
    "refuse_hand_picked_parameters_without_tables",
    "split_saved_optimizer_state",
    "table_param_groups",
]

# Hyper-parameters FBGEMM's fused kernels implement, per optimizer class, and the values of the
# ones they do not implement that are harmless (the class defaults). Weight decay is not among
# them: FBGEMM's SGD and Adagrad ignore it, its row-wise Adagrad runs it only in a mode TorchRec
# never sets, its Adam decays decoupled, and a fused kernel sees only the rows a batch looks up,
# where torch's decays every row at every step.
_NO_DECAY = {"weight_decay": 0, "maximize": False}
_FUSED: dict[type, tuple[tuple[str, ...], dict[str, Any], float]] = {
    # class: (passed through, must equal, optimizer state per table element)
    torch.optim.SGD: (("lr",), {"momentum": 0, "nesterov": False, **_NO_DECAY}, 0.0),
    torch.optim.Adagrad: (("lr", "eps"), {"lr_decay": 0, "initial_accumulator_value": 0, **_NO_DECAY}, 1.0),
    torch.optim.Adam: (
        ("lr", "betas", "eps"), {"amsgrad": False, "decoupled_weight_decay": False, **_NO_DECAY}, 2.0
    ),
    trec_optim.RowWiseAdagrad: (
        ("lr", "eps"), {"lr_decay": 0, "initial_accumulator_value": 0, "weight_decay": 0, "maximize": False}, 0.0
    ),
}
_GPU_ONLY = {torch.optim.Adam}
# FBGEMM's Adam moves only the rows a batch looks up (lazily, as torch.optim.SparseAdam); the
# torch.optim.Adam of configure_optimizers moves every row whose moments are not zero, every step.
_LAZY = {torch.optim.Adam}
_WHY = {
    "momentum": "give the tables a param group with momentum=0 (FBGEMM's fused SGD has none); a scheduler that "
    "cycles momentum sets it too: OneCycleLR or CyclicLR(..., cycle_momentum=False)",
    "weight_decay": "give the tables a param group with weight_decay=0 (FBGEMM's fused update touches only "
    "the rows a batch looks up, so it cannot decay every row as torch does)",
}
_NAMES = (
    "torch.optim.SGD (no momentum), torch.optim.Adagrad, torch.optim.Adam (GPU, lazy), "
    "torchrec.optim.RowWiseAdagrad"
)


# FBGEMM's fused state of a table, by the state torch's optimizer class keeps for it as an ordinary
# parameter (what a checkpoint written under strategy="ddp" holds); "step" only counts steps.
_FUSED_STATE_FROM_TORCH: dict[type, dict[str, str]] = {
    torch.optim.SGD: {},
    torch.optim.Adagrad: {"momentum1": "sum"},
}


@dataclass(frozen=True)
class EmbeddingOptimizer:
    """An optimizer class and hyper-parameters that FBGEMM can run fused in the backward pass.

    Args:
        optimizer_class: ``torch.optim.SGD``, ``torch.optim.Adagrad``, ``torch.optim.Adam`` (GPU only;
            lazy: it moves only the rows a batch looks up, so it is taken only as given here, never
            from ``configure_optimizers``) or ``torchrec.optim.RowWiseAdagrad``.
        kwargs: its hyper-parameters, e.g. ``{"lr": 0.01}``. Weight decay must be 0: the fused update
            sees only the rows a batch looks up.

    Example::

        EmbeddingOptimizer(torch.optim.Adagrad, {"lr": 0.05, "eps": 1e-8})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        EmbeddingOptimizer.from_param_group(opt, opt.param_groups[0])
    """

    optimizer_class: type
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optimizer_class not in _FUSED:
            raise ValueError(
                f"{getattr(self.optimizer_class, '__name__', self.optimizer_class)} has no fused FBGEMM equivalent "
                f"for the embedding tables; use one of {_NAMES}, or pass "
                "HybridParallelStrategy(embedding_optimizer=EmbeddingOptimizer(...)) to train the tables with one"
            )
        passed, required, _ = _FUSED[self.optimizer_class]
        for key, value in self.kwargs.items():
            if key in required and value != required[key]:
                fix = _WHY.get(key, "pass embedding_optimizer= to the strategy")
                raise ValueError(
                    f"{self.optimizer_class.__name__}({key}={value!r}) cannot be fused for the embedding tables "
                    f"(FBGEMM supports {key}={required[key]!r}); {fix}"
                )
            if key not in passed and key not in required:
                raise ValueError(
                    f"{self.optimizer_class.__name__}: hyper-parameter {key!r} is not supported by FBGEMM's fused "
                    f"kernel; supported: {passed}"
                )

    @classmethod
    def from_param_group(cls, optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> "EmbeddingOptimizer":
        """The fused twin of one param group of an optimizer built by ``configure_optimizers``.

        The group's own values are used (``SGD([{"params": tables, "lr": 1.0}], lr=1e-9)`` trains
        the tables at 1.0), as the optimizer itself would for the parameters in that group.
        """
        opt_cls = type(optimizer)
        if opt_cls not in _FUSED:
            cls(opt_cls)  # raises with the list of alternatives
        if opt_cls in _LAZY:
            name = opt_cls.__name__
            raise ValueError(
                f"{name} from configure_optimizers holds embedding tables: FBGEMM's fused {name} updates "
                f"only the rows each batch looks up (as torch.optim.SparseAdam), while torch.optim.{name} "
                "moves every row at every step. Train the tables with torch.optim.Adagrad or SGD (their fused "
                "updates match torch's), or opt into the lazy update with HybridParallelStrategy("
                f"embedding_optimizer=EmbeddingOptimizer(torch.optim.{name}, ...))"
            )
        passed, required, _ = _FUSED[opt_cls]
        kwargs = {k: group[k] for k in passed if k in group}
        kwargs.update({k: group[k] for k in required if k in group})
        return cls(opt_cls, kwargs)

    def fused_state_from(self, table: str, saved: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The fused kernel's state for ``table`` (``"<table>.momentum1"``...), from the state torch's
        optimizer of the same class saved for it as an ordinary parameter; refused where it does not map."""
        mapping = _FUSED_STATE_FROM_TORCH.get(self.optimizer_class)
        if not self.takes_state_from(saved):
            raise ValueError(
                f"table {table!r}: the checkpoint holds optimizer state {sorted(saved)} for it, which does not map "
                f"onto FBGEMM's fused {self.optimizer_class.__name__} (state carried over for: "
                f"{', '.join(c.__name__ for c in _FUSED_STATE_FROM_TORCH)}). Load its weights only "
                "(LightningModule.load_from_checkpoint, then fit without ckpt_path)"
            )
        return {f"{table}.{fused}": saved[kept] for fused, kept in mapping.items()}

    def takes_state_from(self, saved: Mapping[str, Any]) -> bool:
        """Whether the state torch's optimizer saved for a table as an ordinary parameter maps onto the fused kernel."""
        mapping = _FUSED_STATE_FROM_TORCH.get(self.optimizer_class)
        return mapping is not None and set(saved) <= {"step", *mapping.values()}

    @property
    def keeps_state(self) -> bool:
        """Whether the fused kernel keeps optimizer state for the table: all but plain SGD, the one whose
        updates with two gradients in turn equal one update with their sum."""
        return self.optimizer_class is not torch.optim.SGD

    @property
    def state_factor(self) -> float:
        """Optimizer state per table element (Adagrad keeps one accumulator per weight)."""
        return _FUSED[self.optimizer_class][2]

    def check_device(self, device: torch.device) -> None:
        if self.optimizer_class in _GPU_ONLY and device.type != "cuda":
            raise ValueError(
                f"FBGEMM has no fused {self.optimizer_class.__name__} on {device.type}; for the embedding tables use "
                "torch.optim.Adagrad, torchrec.optim.RowWiseAdagrad or torch.optim.SGD "
                "(HybridParallelStrategy(embedding_optimizer=...))"
            )

    def fused_kwargs(self) -> dict[str, Any]:
        passed, _, _ = _FUSED[self.optimizer_class]
        return {k: v for k, v in self.kwargs.items() if k in passed}


def apply_embedding_optimizers(tables: Mapping[str, nn.Parameter], optimizers: Mapping[str, EmbeddingOptimizer]) -> None:
    """Attach its fused optimizer to every table (by name) so TorchRec shards it with fused kernels.

    TorchRec groups tables into one FBGEMM kernel only when their fused hyper-parameters agree, so
    tables of param groups with different values train in different kernels.
    """
    for name, param in tables.items():
        optimizer = optimizers[name]
        # The hook needs a parameter that takes gradients; a frozen table is given learning rate 0.
        param.requires_grad_(True)
        apply_optimizer_in_backward(optimizer.optimizer_class, [param], optimizer.fused_kwargs())


class ParamGroupRef(NamedTuple):
    """Where a table's hyper-parameters come from: ``optimizers[optimizer].param_groups[group]``."""

    optimizer: int
    group: int


def split_saved_optimizer_state(
    saved: Mapping[str, Any], saved_names: Sequence[Sequence[str]], kept: Sequence[Sequence[str]]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """An optimizer's saved state, matched by parameter name to the parameters it holds now.

    Args:
        saved: an ``optimizer.state_dict()``, its parameters numbered in the order of its groups
            (under ``strategy="ddp"`` the tables are among them).
        saved_names: the name of each of those parameters, group by group.
        kept: the names of the parameters each group holds now (the groups' hyper-parameters are
            the saved ones, group by group).

    Returns:
        The state dict to load into the optimizer as it is now (a parameter the file has no state
        for has none in it), and the saved state of each parameter no group holds now (by name)
        that has one.
    """
    by_name = {
        name: saved["state"].get(index)
        for saved_group, names in zip(saved["param_groups"], saved_names)
        for index, name in zip(saved_group["params"], names)
    }
    state: dict[int, Any] = {}
    groups: list[dict[str, Any]] = []
    number = 0  # of the next kept parameter, counted across groups as torch numbers them
    for saved_group, kept_names in zip(saved["param_groups"], kept):
        groups.append({**saved_group, "params": list(range(number, number + len(kept_names)))})
        for name in kept_names:
            if by_name.get(name) is not None:
                state[number] = by_name[name]
            number += 1
    held = {name for names in kept for name in names}
    given_up = {name: param_state for name, param_state in by_name.items() if param_state and name not in held}
    return {"state": state, "param_groups": groups}, given_up


def table_param_groups(
    optimizers: Sequence[torch.optim.Optimizer], tables: Mapping[str, nn.Parameter]
) -> dict[str, ParamGroupRef]:
    """The param group that holds each table (by name) that one of ``optimizers`` holds."""
    holder: dict[int, ParamGroupRef] = {}
    for i, optimizer in enumerate(optimizers):
        for j, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                holder.setdefault(id(p), ParamGroupRef(i, j))
    return {name: holder[id(p)] for name, p in tables.items() if id(p) in holder}


def refuse_hand_picked_parameters_without_tables(
    named_parameters: Iterable[tuple[str, nn.Parameter]], held: Collection[str], tables: Collection[str],
    trainable_tables: Collection[str],
) -> None:
    """Refuse trainable tables in no param group when the optimizers also leave dense parameters out.

    Tables in no param group train by the ``dense_parameters(self)`` convention, with the first
    optimizer's first group: the optimizers hold every other trainable parameter. Where they also
    leave dense parameters out, the parameters were picked by hand (``SGD(self.mlp.parameters())``),
    and under DDP none of those left out, tables included, would train.

    Args:
        named_parameters: the module's.
        held: the names of the parameters the optimizers hold, as ``configure_optimizers`` gave them.
        tables: the names of the embedding tables' parameters; ``trainable_tables``: those not frozen.
    """
    unheld_tables = sorted(set(trainable_tables) - set(held))
    if not unheld_tables:
        return
    unheld_dense = [
        name for name, p in named_parameters if p.requires_grad and name not in held and name not in tables
    ]
    if unheld_dense:
        raise ValueError(
            f"configure_optimizers leaves tables {unheld_tables} and parameters {unheld_dense[:5]}"
            f"{' ...' if len(unheld_dense) > 5 else ''} in no optimizer. Under strategy='ddp' none of them would "
            "train; here tables in no optimizer would train with the first optimizer's first group. Say which: "
            "freeze what should not train (requires_grad_(False)), put the tables in a param group, or give the "
            "optimizer lightning_dembed.dense_parameters(self) (every parameter but the tables, which then train "
            "with its first group)"
        )


def _fused_leaves(optimizer: KeyedOptimizer) -> Iterable[KeyedOptimizer]:
    if isinstance(optimizer, CombinedOptimizer):
        for _, child in optimizer.optimizers:
            yield from _fused_leaves(child)
    else:
        yield optimizer


class TableHyperParameters:
    """Drives FBGEMM's fused table optimizers from the param groups that hold the tables.

    The tables are updated inside backward, before Lightning steps the dense optimizers, with the
    learning rate FBGEMM's kernel read in the forward; so every training step first copies the
    learning rate of each table's param group (as LR schedulers left it) into that kernel: the
    tables then train with the same learning rate at every step as they would as ordinary
    parameters of that group. FBGEMM takes every other hyper-parameter at construction only; a
    schedule that changes one is refused, by name.

    Args:
        fused_optimizer: ``DistributedModelParallel.fused_optimizer``.
        groups: the param group of each table that follows one (`table_param_groups`).
        built_with: the fused optimizer each table's kernel was built with.
    """

    def __init__(
        self,
        fused_optimizer: KeyedOptimizer,
        groups: Mapping[str, ParamGroupRef],
        built_with: Mapping[str, EmbeddingOptimizer],
    ) -> None:
        name_of = {id(t): name for name, t in fused_optimizer.params.items()}
        # Per kernel, the param groups its tables follow (one table named per group, for errors):
        # checked per group, not per table, since every step goes through here.
        self._kernels: list[tuple[KeyedOptimizer, dict[ParamGroupRef, str]]] = []
        for leaf in _fused_leaves(fused_optimizer):
            # Tables in no group (frozen ones) keep the hyper-parameters they were built with.
            names = sorted(n for n in (name_of[id(t)] for t in leaf.params.values()) if n in groups)
            refs: dict[ParamGroupRef, str] = {}
            for name in names:
                refs.setdefault(groups[name], name)
            if refs:
                self._kernels.append((leaf, refs))
        self._built_with = dict(built_with)

    def sync(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Copy each table group's current learning rate into its fused kernel (call before the forward)."""
        for kernel, refs in self._kernels:
            lrs = {}
            for ref, table in refs.items():
                group = optimizers[ref.optimizer].param_groups[ref.group]
                self._check_unchanged(table, ref, group)
                lrs[table] = float(group["lr"])
            lr = next(iter(lrs.values()))
            if any(value != lr for value in lrs.values()):
                raise ValueError(
                    f"tables {sorted(lrs)} share one FBGEMM kernel (their hyper-parameters were equal at setup) "
                    f"but their param groups now ask for different learning rates {lrs}; give the tables one "
                    "param group, or give their groups different initial hyper-parameters so they get separate "
                    "kernels"
                )
            if kernel.param_groups[0]["lr"] != lr:
                kernel.param_groups[0]["lr"] = lr
                # TorchRec's fused optimizers push param_groups' lr into the kernel here (step() would too).
                kernel.zero_grad()

    def check_learning_rates_kept(
        self, optimizers: Sequence[torch.optim.Optimizer], between: str = "the forward and the backward"
    ) -> None:
        """Refuse a table group's learning rate changed since the forward (``between`` says when it was seen).

        The fused kernels update the tables inside backward with the learning rate `sync` gave them
        before the forward; the dense parameters would take the new one at their optimizer step.
        """
        for kernel, refs in self._kernels:
            used = kernel.param_groups[0]["lr"]
            for ref, table in refs.items():
                now = float(optimizers[ref.optimizer].param_groups[ref.group]["lr"])
                if now != used:
                    raise ValueError(
                        f"param group {ref.group} of optimizer {ref.optimizer} changed its learning rate from "
                        f"{used!r} to {now!r} between {between} of one training step, but it holds table "
                        f"{table!r}, which FBGEMM updates inside backward with the learning rate of the forward, "
                        "where the dense parameters would take the new one. Step LR schedulers (and set learning "
                        "rates) after optimizer.step() or before the forward, never in on_before_optimizer_step"
                    )

    def _check_unchanged(self, name: str, ref: ParamGroupRef, group: dict[str, Any]) -> None:
        built = self._built_with[name]
        for key, value in built.kwargs.items():
            if key != "lr" and key in group and group[key] != value:
                raise ValueError(
                    f"param group {ref.group} of optimizer {ref.optimizer} changed {key!r} from {value!r} to "
                    f"{group[key]!r} during training (an LR scheduler's momentum cycling does this), but it holds "
                    f"table {name!r}, whose fused FBGEMM optimizer takes {key!r} at construction only. Schedule "
                    "only the learning rate (e.g. OneCycleLR(cycle_momentum=False)), or keep the tables out of "
                    "that optimizer (lightning_dembed.dense_parameters)"
                )
