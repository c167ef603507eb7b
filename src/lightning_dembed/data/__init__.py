"""Click data for recommender training: synthetic models' streams, Criteo logs, MovieLens ratings and
task stores for meta-learning, Lightning data modules.

Imports flow one way: `batch` and `position` <- `click_format` <- `criteo`, `synthetic`;
`movielens` <- `task_store` <- `task_loader`; `datamodules` uses them all. HF ``datasets`` is
imported only when a task store is built or loaded, so this package imports without it.

Every data set here yields `Batch` (TorchRec's): dense features, a `KeyedJaggedTensor` of sparse
features, labels.
"""

from lightning_dembed.data.batch import Batch, TaskBatch
from lightning_dembed.data.click_format import ClickDataInfo, ClickDataset, ClickDataWriter
from lightning_dembed.data.criteo import (
    CRITEO_1TB_NUM_EMBEDDINGS,
    CriteoTsvReader,
    criteo_tables,
    map_categorical,
    preprocess,
    preprocess_main,
    write_fake_criteo_tsv,
)
from lightning_dembed.data.datamodules import RecDataModule, TaskDataModule
from lightning_dembed.data.movielens import (
    movielens_format,
    read_interactions,
    read_movielens,
    write_fake_movielens,
)
from lightning_dembed.data.synthetic import (
    SYNTHETIC_MODELS,
    SyntheticClickDataset,
    SyntheticModelConfig,
    TableGroup,
    materialize,
)
from lightning_dembed.data.task_loader import MetaBatchDataset, QueryRowDataset
from lightning_dembed.data.task_store import TaskStore, build_task_store
from lightning_dembed.data.tasks import (
    ClickModel,
    SyntheticTaskConfig,
    generate_interactions,
    generate_with_click_model,
)

__all__ = [
    "MetaBatchDataset",
    "QueryRowDataset",
    "ClickModel",
    "SyntheticTaskConfig",
    "TaskDataModule",
    "TaskStore",
    "build_task_store",
    "generate_interactions",
    "generate_with_click_model",
    "movielens_format",
    "read_interactions",
    "read_movielens",
    "write_fake_movielens",
    "CRITEO_1TB_NUM_EMBEDDINGS",
    "SYNTHETIC_MODELS",
    "Batch",
    "ClickDataInfo",
    "ClickDataWriter",
    "ClickDataset",
    "CriteoTsvReader",
    "RecDataModule",
    "SyntheticClickDataset",
    "SyntheticModelConfig",
    "TableGroup",
    "TaskBatch",
    "criteo_tables",
    "map_categorical",
    "materialize",
    "preprocess",
    "preprocess_main",
    "write_fake_criteo_tsv",
]
