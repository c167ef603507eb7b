"""DLRM / DLRM-DCN on sharded embeddings, on generated Merlin-style data, Criteo, or task data.

    lightning-dembed run recipes/configs/dlrm_synthetic_tiny.yaml --devices 2
    python recipes/dlrm.py fit --config recipes/configs/dlrm_synthetic_tiny.yaml --trainer.devices=1

Every knob is in the YAML; see docs/recipes.md.
"""

from lightning.pytorch import LightningDataModule

import lightning_dembed  # noqa: F401  registers strategy="hybrid_parallel"
from lightning_dembed.models import DLRMModule
from lightning_dembed.recipe import RecipeCLI

if __name__ == "__main__":
    RecipeCLI(DLRMModule, LightningDataModule)
