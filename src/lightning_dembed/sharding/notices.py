"""TorchRec's notices that no user can act on, kept off the start-up screen.

Each one is printed per table and per rank, or for arguments TorchRec passes itself:

- the planner logs "Sharding spec not found" for every replicated (data_parallel) table, which has
  none by design;
- sharding logs "caching params will be ignored" for every replicated table, given caching
  parameters or not;
- TorchRec passes DDP's deprecated ``broadcast_buffers`` itself (a FutureWarning).

`torchrec_notices_silenced` drops exactly those while TorchRec plans and shards, and nothing else.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

__all__ = ["torchrec_notices_silenced"]

_LOGGED = ("Sharding spec not found for ", "Sharding Type is data_parallel, caching params will be ignored")
# The loggers TorchRec emits them on: the root logger (planner) and its module logger (sharding).
_LOGGERS = ("", "torchrec.distributed.utils")


class _Notices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_LOGGED)


@contextmanager
def torchrec_notices_silenced() -> Iterator[None]:
    """Within: TorchRec's per-table notices on replicated tables and its own DDP deprecation are dropped."""
    notices = _Notices()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        logger.addFilter(notices)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(notices)
