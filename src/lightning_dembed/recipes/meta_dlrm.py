"""Meta-DLRM: DLRM meta-learned over tasks (MAML family) with sharded embeddings, G-Meta style.

    lightning-dembed run meta_dlrm_synthetic --devices 2

The `meta` section of the YAML configures `MetaLearningLoop`; see docs/meta-learning.md.
"""

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser

from lightning_dembed.meta import MetaLearningLoop
from lightning_dembed.models import DLRMModule
from lightning_dembed.recipe import RecipeCLI


class MetaRecipeCLI(RecipeCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(MetaLearningLoop, "meta")


def main() -> None:
    MetaRecipeCLI(DLRMModule, LightningDataModule)


if __name__ == "__main__":
    main()
