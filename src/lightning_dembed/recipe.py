"""What every recipe shares: a LightningCLI that wires the model to its data and tests after fit."""

from __future__ import annotations

import json
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

__all__ = ["RecipeCLI"]


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

    Example::

        RecipeCLI(DLRMModule, LightningDataModule)  # python -m lightning_dembed.recipes.dlrm fit --config my.yaml
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The data class is chosen in the YAML (data.class_path): synthetic, Criteo or task data.
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", _LogConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The config names its recipe, for `lightning-dembed run`; the recipe itself has no use for it.
        parser.add_argument("--recipe", type=Optional[str], default=None, help="the recipe this config runs with")
        parser.link_arguments("data", "model.tables", compute_fn=lambda data: data.tables(), apply_on="instantiate")
        parser.link_arguments(
            "data", "model.num_dense_features", compute_fn=lambda data: data.num_dense_features, apply_on="instantiate"
        )

    def after_fit(self) -> None:
        # A config that selects checkpoints by a validation metric is tested on its best one.
        checkpoint = self.trainer.checkpoint_callback
        selects = checkpoint is not None and checkpoint.monitor and checkpoint.best_model_path
        best = "best" if selects else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)
