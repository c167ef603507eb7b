"""Meta-DLRM: DLRM meta-learned over tasks (MAML family) with sharded embeddings, G-Meta style.

    lightning-dembed run meta_dlrm_synthetic --devices 2

The `meta` section of the YAML configures `MetaLearningLoop`; see docs/meta-learning.md.
"""

from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser

from lightning_dembed.meta import MetaLearningLoop
from lightning_dembed.models import DLRMModule
from lightning_dembed.recipe import RecipeCLI, record_whole


class MetaRecipeCLI(RecipeCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(MetaLearningLoop, "meta")


def cli(**kwargs: Any) -> MetaRecipeCLI:
    """This recipe's LightningCLI; ``kwargs`` go to `RecipeCLI` (``args``, ``parse_only``, ...)."""
    return MetaRecipeCLI(DLRMModule, LightningDataModule, **kwargs)


@record_whole  # under an elastic launcher, a failing rank's traceback goes to its error file for the launcher to show
def main() -> None:
    cli()


if __name__ == "__main__":
    main()
