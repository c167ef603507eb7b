"""DLRM / DLRM-DCN on sharded embeddings, on generated Merlin-style data, Criteo, or task data.

    lightning-dembed run dlrm_synthetic_tiny --devices 2
    python -m lightning_dembed.recipes.dlrm fit --config my_config.yaml --trainer.devices=1

Every knob is in the YAML; see docs/recipes.md.
"""

from typing import Any

from lightning.pytorch import LightningDataModule

from lightning_dembed.models import DLRMModule
from lightning_dembed.recipe import RecipeCLI, record_whole


def cli(**kwargs: Any) -> RecipeCLI:
    """This recipe's LightningCLI; ``kwargs`` go to `RecipeCLI` (``args``, ``parse_only``, ...)."""
    return RecipeCLI(DLRMModule, LightningDataModule, **kwargs)


@record_whole  # under an elastic launcher, a failing rank's traceback goes to its error file for the launcher to show
def main() -> None:
    cli()


if __name__ == "__main__":
    main()
