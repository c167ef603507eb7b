"""Click data for recommender training: synthetic models' streams, Criteo logs, MovieLens ratings and
task stores for meta-learning, Lightning data modules.

Every data set here yields `Batch` (TorchRec's): dense features, a `KeyedJaggedTensor` of sparse
features, labels.
"""

from lightning_dembed.data.batch import Batch, TaskBatch
from lightning_dembed.data.criteo import (
    CRITEO_1TB_NUM_EMBEDDINGS,
    ClickDataInfo,
    ClickDataWriter,
    CriteoDataset,
    CriteoTsvReader,
    criteo_tables,
    map_categorical,
    preprocess,
    preprocess_main,
    write_fake_criteo_tsv,
)
from lightning_dembed.data.datamodule import RecDataModule
from lightning_dembed.data.meta_datamodule import TaskDataModule
from lightning_dembed.data.meta_io import MetaBatchDataset, QueryRowDataset, TaskStore, build_task_store
from lightning_dembed.data.movielens import (
    movielens_format,
    read_interactions,
    read_movielens,
    write_fake_movielens,
)
from lightning_dembed.data.tasks import SyntheticTaskConfig, generate_interactions
from lightning_dembed.data.synthetic import (
    SYNTHETIC_MODELS,
    SyntheticClickDataset,
    SyntheticModelConfig,
    TableGroup,
    materialize,
)

__all__ = [
    "MetaBatchDataset",
    "QueryRowDataset",
    "SyntheticTaskConfig",
    "TaskDataModule",
    "TaskStore",
    "build_task_store",
    "generate_interactions",
    "movielens_format",
    "read_interactions",
    "read_movielens",
    "write_fake_movielens",
    "CRITEO_1TB_NUM_EMBEDDINGS",
    "SYNTHETIC_MODELS",
    "Batch",
    "ClickDataInfo",
    "ClickDataWriter",
    "CriteoDataset",
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
