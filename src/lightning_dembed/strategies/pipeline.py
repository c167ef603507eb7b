"""The train dataloader of `HybridParallelStrategy`, one batch ahead of the step.

Lightning fetches batch i just before step i. `PipelinedLoader` also fetches batch i+1 then and
starts its input all-to-alls (`LookupPipeline.prefetch`), so they run while step i computes; the
strategy finishes their first half after step i's forward, as TorchRec's `TrainPipelineSparseDist`
does. Everything Lightning reads from a dataloader (its length, sampler, dataset) is the wrapped
loader's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Callable

from lightning_dembed.sharding.lookup import LookupPipeline

__all__ = ["PipelinedLoader"]

_END = object()


class PipelinedLoader:
    """Yields ``loader``'s batches, having started the input stage of the batch after each.

    Args:
        loader: the train dataloader.
        pipeline: the strategy's sharded lookups.
        to_device: moves a batch to the device as Lightning's default transfer does.
        same_length_on_every_rank: called as each epoch starts. Every rank must start the same
            exchanges in the same order, so batches are fetched ahead only in epochs where every
            rank's loader has the same length (it fails every rank where the lengths differ, and
            says False where they are unknown: those epochs run unpipelined).
    """

    def __init__(
        self,
        loader: Iterable,
        pipeline: LookupPipeline,
        to_device: Callable[[Any], Any],
        same_length_on_every_rank: Callable[[], bool],
    ) -> None:
        self.loader = loader
        self.pipeline = pipeline
        self.to_device = to_device
        self.same_length_on_every_rank = same_length_on_every_rank

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  # TypeError without one, as the loader's

    def __getattr__(self, name: str) -> Any:
        # sampler, dataset, batch_size...: Lightning and users read them from the loader.
        if name == "loader":  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        self.pipeline.drain()
        if not (self.pipeline.active and self.same_length_on_every_rank()):
            yield from self.loader
            return
        batches = iter(self.loader)
        upcoming = self._fetch(batches)
        while upcoming is not _END:
            current, upcoming = upcoming, self._fetch(batches)
            yield current

    def _fetch(self, batches: Iterator[Any]) -> Any:
        batch = next(batches, _END)
        if batch is _END:
            return _END
        batch = self.to_device(batch)
        self.pipeline.prefetch(batch)
        return batch
