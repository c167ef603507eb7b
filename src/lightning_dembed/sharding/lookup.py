"""A sharded embedding module's forward in two stages, so the first can run one batch ahead.

TorchRec's `ShardedModule.forward` is ``input_dist`` (send each id to the rank that holds its
row: two all-to-alls, of the splits and then of the ids) followed by ``compute_and_output_dist``
(look up, pool, send the results back). `ShardedLookup` replaces that forward on each sharded
module of the strategy and keeps what the strategy adds around it in the same place:

- the input stage takes the module's own features (other keys are ignored, as unsharded; missing
  ones fail), checks their ids when asked, pads a
  rank's short batch where gloo's row-wise exchange needs equal row counts, and starts the input
  all-to-alls;
- a second forward with gradients before the backward is refused where the tables' fused update
  is not linear in the gradient: FBGEMM updates the tables once per forward's gradient, in turn,
  where DDP would step once on their sum (Adagrad's state differs; plain SGD's does not);
- `prefetch` runs the input stage on the next batch while the current one trains, as TorchRec's
  `TrainPipelineSparseDist` does; the forward then uses it when it is called with those very
  features (same tensors, unchanged since), and otherwise runs the input stage itself. A model
  that builds or edits its features inside the step therefore trains exactly as unpipelined, only
  without the overlap. It must do so on every rank alike: a forward given other features on some
  ranks only fails there, naming ``pipeline=False`` (the other ranks' exchanges, started ahead,
  cannot pair with a new one on those ranks alone).

Ids are checked on the hot path by FBGEMM's kernels (``BoundsCheckMode.FATAL``, no host sync).
Where its error is a host exception (CPU), the lookup re-checks that batch and raises a message
naming the feature and the table; on GPU the kernel's assertion is fatal to the process, and
``check_ids=True`` checks every batch before the lookup instead, at one host sync per step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.distributed as dist
from torchrec.distributed.types import Awaitable, ShardedModule
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from lightning_dembed._private import tensor_version
from lightning_dembed.sharding.hooks import FeatureCheck, pad_to_stride, then
from lightning_dembed.sharding.types import ROW_SPLIT_TYPES

__all__ = ["LookupPipeline", "ShardedLookup", "find_features"]

log = logging.getLogger(__name__)

# Inputs started ahead and not yet used, at most: the step's and the next one's; one more means the
# forwards are not using them (checked before starting another).
_MOST_AHEAD = 3

# Sharding types whose pooled output is reduce-scattered across ranks.
_REDUCE_SCATTER_TYPES = frozenset({*ROW_SPLIT_TYPES, "grid_shard"})


def find_features(batch: Any, depth: int = 4) -> list[KeyedJaggedTensor]:
    """The `KeyedJaggedTensor` objects in a batch: itself, or in its dataclass fields, mappings, sequences."""
    if isinstance(batch, KeyedJaggedTensor):
        return [batch]
    if depth == 0:
        return []
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        children = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    elif isinstance(batch, Mapping):
        children = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        children = list(batch)
    else:
        return []
    return [kjt for child in children for kjt in find_features(child, depth - 1)]


def _data(features: KeyedJaggedTensor) -> tuple[Optional[torch.Tensor], ...]:
    """The tensors that decide what a lookup of ``features`` returns."""
    # Lengths, or offsets where a KJT was built from them (the other may be derived lazily later).
    lengths = features.lengths_or_none()
    return (features.values(), features.weights_or_none(), lengths if lengths is not None else features.offsets_or_none())


def _versions(features: KeyedJaggedTensor) -> tuple[int, ...]:
    # Ids or weights edited in place (hashing ids into the table size, say) make a different batch.
    return tuple(-1 if t is None else tensor_version(t) for t in (features.values(), features.weights_or_none()))


@dataclasses.dataclass
class _StartedInput:
    """One batch's input stage: its features as given, and the all-to-alls under way."""

    features: KeyedJaggedTensor
    own: KeyedJaggedTensor  # the module's features among them, what is looked up
    rows: int  # the batch's own row count; the lookup may run on more (padding)
    context: Any
    request: Awaitable  # of the splits; after `splits_done`, of the ids
    versions: tuple[int, ...] = ()
    ids_under_way: bool = False

    def splits_done(self) -> None:
        """Wait for the splits all-to-all; this starts the ids' all-to-all, which overlaps what follows."""
        if not self.ids_under_way:
            self.request = self.request.wait()
            self.ids_under_way = True

    def dist_input(self) -> Any:
        self.splits_done()
        return self.request.wait()

    def same_as(self, features: KeyedJaggedTensor) -> bool:
        """Whether ``features`` is this batch's, as prefetched: same keys, same tensors, not modified since."""
        return (
            features.keys() == self.features.keys()
            and all(a is b for a, b in zip(_data(self.features), _data(features)))
            and _versions(features) == self.versions
        )


class ShardedLookup:
    """The forward installed on a sharded embedding module: input stage, then lookup and output.

    Args:
        module: the sharded module (TorchRec `ShardedEmbeddingBagCollection` or `ShardedEmbeddingCollection`).
        check: the features and id ranges of its unsharded twin.
        sharding_types: the sharding types of its tables (row-wise ones need padding on gloo).
        check_ids: check every id before the lookup (one host sync), not only when FBGEMM fails.
        control_group: a gloo group of all ranks, for their small host-side agreements.
        updates_add_up: whether the tables' fused updates for two gradients, one after the other,
            equal one update for their sum (plain SGD): then the module may run forward
            more than once per backward.
    """

    def __init__(
        self,
        module: ShardedModule,
        check: FeatureCheck,
        sharding_types: set[str],
        check_ids: bool,
        control_group: Optional[dist.ProcessGroup],
        updates_add_up: bool,
    ) -> None:
        self.module = module
        self.updates_add_up = updates_add_up
        self.forwards_since_backward = 0  # with gradients
        self.control_group = control_group
        self.check = check
        self.check_ids = check_ids
        # Gloo's all-gather in the row-wise backward needs one row count on every rank (NCCL copes).
        self.pads = bool(sharding_types & _REDUCE_SCATTER_TYPES) and dist.get_backend() == "gloo"
        self.prefetching = True
        self.used_ahead = 0  # forwards that found their input stage done ahead
        self._started: list[_StartedInput] = []
        self._last_count: Optional[dist.Work] = None  # the last forward's count of ranks not using theirs

    def feeds(self, features: KeyedJaggedTensor, exactly: bool) -> bool:
        """Whether ``features`` holds this module's features (``exactly`` those, or more)."""
        own, given = set(self.check.table_of), set(features.keys())
        return own == given if exactly else own < given

    def start(self, features: KeyedJaggedTensor) -> _StartedInput:
        """The input stage: own features, checked, padded to the ranks' largest batch if needed; all-to-alls started."""
        own = self.check.own(features)
        rows, versions = features.stride(), _versions(features)
        padded = own
        if self.pads:
            most = torch.tensor([rows], dtype=torch.int64)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            padded = pad_to_stride(own, int(most))
        context = self.module.create_context()
        request = self.module.input_dist(context, padded)
        return _StartedInput(features, own, rows, context, request, versions)

    def prefetch(self, features: KeyedJaggedTensor) -> None:
        if len(self._started) >= _MOST_AHEAD:
            # Batches fetched after the oldest one have piled up without its forward ever using it.
            self._stop_prefetching()
            return
        self._started.append(self.start(features))

    def splits_done(self) -> None:
        for started in self._started:
            started.splits_done()

    def drain(self) -> None:
        """Finish every exchange started ahead: every rank started them, so every rank waits for them."""
        self._wait_last_count()
        for started in self._started:
            started.dist_input()
        self._started = []

    def _wait_last_count(self) -> None:
        if self._last_count is not None:
            self._last_count.wait()
            self._last_count = None

    def _stop_prefetching(self) -> None:
        self.drain()
        self.prefetching = False
        log.info(
            "pipeline off for %s: it is not called with the batch's KeyedJaggedTensor as the dataloader yields it "
            "(built, split or modified in the step); it trains unpipelined",
            self.check.module_path,
        )

    def _take(self, features: KeyedJaggedTensor, training: bool) -> Optional[_StartedInput]:
        """The input started ahead for ``features``; None where every rank runs the input stage anew.

        Whether a forward is given the batch as fetched is decided by each rank from its own
        batch, and all ranks must decide alike: a rank that ran the input stage anew would leave
        the others alone in its all-to-alls. The ranks count those not given their batch (a sum on
        the control group, off the model's collectives) without stopping for it: a rank given its
        batch uses the input started ahead at once and completes the count later; a rank given
        other features waits for the count, runs the input stage anew where every rank does, and
        fails where some ranks have already gone on. Inputs are used in the order they were
        fetched; those never used pile up until `prefetch` stops (on every rank alike), or, where
        they were started from a KeyedJaggedTensor holding more than this module's features, stop
        at the first training forward given another.
        """
        self._wait_last_count()
        if not self._started:  # the same on every rank: prefetches are
            return None
        given_other = not self._started[0].same_as(features)
        count = torch.tensor([int(given_other)], dtype=torch.int32)
        work = dist.all_reduce(count, op=dist.ReduceOp.SUM, group=self.control_group, async_op=True)
        if not given_other:
            self._last_count = work
            return self._started.pop(0)
        work.wait()
        if int(count) < dist.get_world_size(self.control_group):
            raise ValueError(
                f"{self.check.module_path}: on rank {dist.get_rank()} this step's forward was given other sparse "
                "features than the batch's (built or changed in the step), on other ranks the batch's own. Those "
                "ranks' input exchanges were started a batch ahead and cannot pair with a new one on some ranks "
                "alone. Build or change the features alike on every rank, or train unpipelined: "
                "HybridParallelStrategy(pipeline=False)"
            )
        if training and self._started[0].own is not self._started[0].features:
            # Started from a KeyedJaggedTensor holding more than this module's features, and a training
            # forward was given another (the model splits the batch's itself): none will be used.
            # (A validation forward between two training steps leaves the next step's input queued.)
            self._stop_prefetching()
        return None

    def _count_trained_forward(self) -> None:
        self.forwards_since_backward += 1
        if self.forwards_since_backward > 1 and not self.updates_add_up:
            raise ValueError(
                f"{self.check.module_path} ran forward again before the backward, but FBGEMM updates its tables "
                "inside backward once per forward's gradient, which with their optimizer (not plain SGD) is not the "
                "one update of the summed gradient that DDP makes. Look up all ids "
                "in one call (concatenate the KeyedJaggedTensors, then split the output), or run the forward "
                "whose output is not trained under torch.no_grad()"
            )

    def _refuse_trainable_id_weights(self, features: KeyedJaggedTensor) -> None:
        weights = features.weights_or_none()
        if weights is not None and weights.requires_grad:
            raise ValueError(
                f"{self.check.module_path}: the ids' weights require grad (computed from trainable parameters, as "
                "TorchRec's PositionWeightedModule or a learned per-feature scale computes them); the input "
                "exchange of sharded tables passes no gradient back to them, so they would stay as they are, where "
                "strategy='ddp' trains them. Give the weights without gradient (detach them, or keep them in a "
                "buffer), or train that model with strategy='ddp'"
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        features = args[0] if args else kwargs.get("features")
        if len(args) + len(kwargs) != 1 or not isinstance(features, KeyedJaggedTensor):
            return type(self.module).forward(self.module, *args, **kwargs)
        if torch.is_grad_enabled() and self.module.training:  # evaluation may adapt with gradients, not train
            self._count_trained_forward()
            self._refuse_trainable_id_weights(features)
        started = self._take(features, self.module.training)
        if started is None:
            started = self.start(features)
        else:
            self.used_ahead += 1
        if self.check_ids:
            # The ids looked up, when they are: an input started ahead may never be (a wrapper that
            # remaps the batch's raw ids, a model that splits the features itself).
            self.check.ids(started.own)
        dist_input = started.dist_input()
        try:
            output = self.module.compute_and_output_dist(started.context, dist_input)
        except RuntimeError:
            # FBGEMM's bounds check failed (or something else did): name the id if it is this rank's.
            self.check.ids(started.own)
            raise
        if self.pads:
            output = then(output, lambda pooled: _first_rows(pooled, started.rows))
        return output


def _first_rows(pooled: Any, rows: int) -> Any:
    """The output for the batch's own ``rows``, without the empty bags padding added after them."""
    if isinstance(pooled, Mapping):  # an EmbeddingCollection's JaggedTensor per feature: the pads are empty
        return {
            key: JaggedTensor(values=jt.values(), lengths=jt.lengths()[:rows], weights=jt.weights_or_none())
            for key, jt in pooled.items()
        }
    if not isinstance(pooled, KeyedTensor) or pooled.values().shape[0] == rows:
        return pooled
    return KeyedTensor(
        keys=pooled.keys(), length_per_key=pooled.length_per_key(), values=pooled.values()[:rows],
        key_dim=pooled.key_dim(),
    )


class LookupPipeline:
    """Runs the input stage of every sharded lookup one batch ahead (see the module docstring).

    Args:
        lookups: the strategy's lookups, by module path.
    """

    def __init__(self, lookups: dict[str, ShardedLookup]) -> None:
        self.lookups = lookups

    @property
    def active(self) -> bool:
        return any(lookup.prefetching for lookup in self.lookups.values())

    def prefetch(self, batch: Any) -> None:
        """Start the input stage of ``batch`` for each lookup whose features it holds."""
        features = find_features(batch)
        for lookup in self.lookups.values():
            # The one holding exactly its features, else the one holding more (one for several modules).
            mine = [kjt for kjt in features if lookup.feeds(kjt, exactly=True)] or [
                kjt for kjt in features if lookup.feeds(kjt, exactly=False)
            ]
            if lookup.prefetching and len(mine) == 1:
                lookup.prefetch(mine[0])

    def splits_done(self) -> None:
        for lookup in self.lookups.values():
            lookup.splits_done()

    def forget_forwards(self) -> None:
        """Forget the forwards counted so far: a backward consumed them, or a step begins."""
        for lookup in self.lookups.values():
            lookup.forwards_since_backward = 0

    def drain(self) -> None:
        """Finish every exchange started ahead (every rank started the same ones)."""
        for lookup in self.lookups.values():
            lookup.drain()
