"""Where an iterable data set's next pass starts, so a resumed run reads what an uninterrupted one would."""

from __future__ import annotations

__all__ = ["ResumablePasses"]


class ResumablePasses:
    """Mixin for the project's iterable data sets: passes numbered by ``epoch``, a start batch.

    Each pass (epoch) of such a data set is a function of its epoch number (the shuffle seed) and
    yields whole batches in order. `set_position` makes the next pass epoch ``epoch`` starting at
    its batch ``batch``; later passes start at 0. Set it in the main process before the loader
    first iterates, and DataLoader workers (persistent or not) copy it with the data set.
    """

    epoch: int = 0
    _start_batch: int = 0

    def set_position(self, epoch: int, batch: int) -> None:
        """Make the next pass epoch ``epoch``, skipping its first ``batch`` batches."""
        if epoch < 0 or batch < 0:
            raise ValueError(f"a data position is a non-negative epoch and batch, got ({epoch}, {batch})")
        self.epoch, self._start_batch = epoch, batch

    def _take_start_batch(self) -> int:
        """The batches this pass skips (only the first pass after `set_position` skips any)."""
        start, self._start_batch = self._start_batch, 0
        return start
