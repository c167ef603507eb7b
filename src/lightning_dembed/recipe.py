"""What every recipe shares: a LightningCLI that wires the model to its data and tests after fit."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

__all__ = ["RecipeCLI", "record_whole", "with_base_configs"]

_Main = TypeVar("_Main", bound=Callable[..., Any])


class _WholeFileErrorHandler(ErrorHandler):
    """torch elastic's error file, written to a temporary name and renamed into place.

    The launcher stops the other ranks as soon as one fails and then parses every error file it finds;
    a rank stopped halfway through writing its file left half a JSON document, and the launcher's
    ``JSONDecodeError`` replaced the failing rank's traceback as the last thing it printed.
    """

    def record_exception(self, e: BaseException) -> None:
        path = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if not path:
            return
        data = {"message": {"message": f"{type(e).__name__}: {e}", "extraInfo": {
            "py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}}
        partial = f"{path}.{os.getpid()}.partial"
        with open(partial, "w") as file:
            json.dump(data, file)
        os.replace(partial, path)


def record_whole(main: _Main) -> _Main:
    """torch elastic's ``@record`` for a recipe's ``main``: a failing rank's traceback goes, whole, to the
    error file the launcher shows."""
    return record(main, error_handler=_WholeFileErrorHandler())


def with_base_configs(args: list[str]) -> list[str]:
    """``args`` with each ``--config FILE`` preceded by the config its ``base:`` key names, recursively.

    A base is a path relative to the YAML that names it (``base: _base.yaml``); jsonargparse reads
    several ``--config`` in order, later keys winning, so the named config's keys override its base.
    """
    expanded: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in ("--config", "-c") and index + 1 < len(args):
            config, index = args[index + 1], index + 2
        elif arg.startswith("--config="):
            config, index = arg.partition("=")[2], index + 1
        else:
            expanded.append(arg)
            index += 1
            continue
        path = Path(config)
        base = (yaml.safe_load(path.read_text()) or {}).get("base") if path.is_file() else None
        if base is not None:
            expanded += with_base_configs(["--config", str(path.parent / base)])
        expanded += ["--config", config]
    return expanded


class _LogConfig(SaveConfigCallback):
    """Saves the resolved config beside the logs and sends it to the loggers (W&B run config)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Nested, as in the YAML, so W&B can filter and group runs by any key (trainer.max_steps...).
        config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class RecipeCLI(LightningCLI):
    """LightningCLI for a recommender recipe.

    The model's ``tables`` and ``num_dense_features`` come from the datamodule (the data decides
    which features exist and how many rows each table has), so configs set them in one place. After
    ``fit`` the model is tested on the held-out split: from the best checkpoint when the config's
    ``ModelCheckpoint`` monitors a validation metric, else as training left it.

    Args:
        parse_only: only parse and validate the arguments (unknown keys, types, class paths, config
            files), then return: nothing is built, seeded or run. ``lightning-dembed run`` does this
            once, before it starts any process. Errors raise (or exit, by ``parser_kwargs``) as usual.
        *args, **kwargs: LightningCLI's.

    Example::

        RecipeCLI(DLRMModule, LightningDataModule)  # python -m lightning_dembed.recipes.dlrm fit --config my.yaml
    """

    def __init__(self, *args: Any, parse_only: bool = False, **kwargs: Any) -> None:
        self.parse_only = parse_only
        # The data class is chosen in the YAML (data.class_path): synthetic, Criteo or task data.
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", _LogConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The config names its recipe, for `lightning-dembed run`; the recipe itself has no use for it.
        parser.add_argument("--recipe", type=Optional[str], default=None, help="the recipe this config runs with")
        # Resolved before parsing (with_base_configs); declared so that a config may carry the key.
        parser.add_argument("--base", type=Optional[str], default=None, help="a YAML this config builds on")
        parser.link_arguments("data", "model.tables", compute_fn=lambda data: data.tables(), apply_on="instantiate")
        parser.link_arguments(
            "data", "model.num_dense_features", compute_fn=lambda data: data.num_dense_features, apply_on="instantiate"
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
            return
        config = parser.parse_args(with_base_configs(sys.argv[1:] if args is None else list(args)))
        # The bases are read in: the config saved beside the logs stands alone, wherever it is run from.
        (config[config.subcommand] if config.get("subcommand") else config).base = None
        # LightningCLI goes on from its config: with no subcommand and no seed it runs, seeds and loads nothing.
        self.config = Namespace(subcommand=None, seed_everything=False) if self.parse_only else config

    def instantiate_classes(self) -> None:
        if not self.parse_only:
            super().instantiate_classes()

    def after_fit(self) -> None:
        # A config that selects checkpoints by a validation metric is tested on its best one.
        checkpoint = self.trainer.checkpoint_callback
        selects = checkpoint is not None and checkpoint.monitor and checkpoint.best_model_path
        best = "best" if selects else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)
