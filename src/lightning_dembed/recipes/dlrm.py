"""DLRM / DLRM-DCN on sharded embeddings, on generated Merlin-style data, Criteo, or task data.

    lightning-dembed run dlrm_synthetic_tiny --devices 2
    python -m lightning_dembed.recipes.dlrm fit --config my_config.yaml --trainer.devices=1

Every knob is in the YAML; see docs/recipes.md.
"""

from lightning.pytorch import LightningDataModule

from lightning_dembed.models import DLRMModule
from lightning_dembed.recipe import RecipeCLI


def main() -> None:
    RecipeCLI(DLRMModule, LightningDataModule)


if __name__ == "__main__":
    main()
