"""Lightning data modules, sharded by rank: click data (`RecDataModule`) and tasks (`TaskDataModule`).

Both keep one data set per split and record in checkpoints where training stands in the train
split (`SplitDataModule`), so a resumed run reads on from there.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Optional, Union

from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, IterableDataset
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from lightning_dembed._private import batches_done_in_epoch
from lightning_dembed.data.click_format import ClickDataInfo, ClickDataset
from lightning_dembed.data.criteo import CRITEO_NUM_DENSE, criteo_tables, preprocess
from lightning_dembed.data.synthetic import SYNTHETIC_MODELS, SyntheticClickDataset
from lightning_dembed.data.task_loader import MetaBatchDataset, QueryRowDataset
from lightning_dembed.data.task_store import TaskStore, build_task_store, table_sizes
from lightning_dembed.data.tasks import SyntheticTaskConfig, write_interactions

__all__ = ["RecDataModule", "SplitDataModule", "TaskDataModule"]

log = logging.getLogger(__name__)

_PREPROCESSED = "preprocessed"


def _raw_criteo_files(directory: Path) -> list[Path]:
    days = sorted(
        (path for path in directory.iterdir() if re.fullmatch(r"day_\d+", path.name)),
        key=lambda path: int(path.name[4:]),
    )
    if days:
        return days
    if (directory / "train.txt").is_file():
        return [directory / "train.txt"]
    return []


class SplitDataModule(LightningDataModule):
    """Holds one data set per split in ``_datasets``; subclasses say how a split is loaded.

    Checkpoints record where training stands in the train split (epoch and batch), and a resumed
    run starts reading there: training 2K steps equals K steps, a save (mid-epoch too), a resume
    in fresh processes and K more, with shuffling on.
    """

    _datasets: dict[str, IterableDataset]

    def state_dict(self) -> dict[str, Any]:
        train = self._datasets.get("train") if hasattr(self, "_datasets") else None
        if self.trainer is None or train is None or self.trainer.state.fn != TrainerFn.FITTING:
            return {}
        epoch, batch = self.trainer.current_epoch, batches_done_in_epoch(self.trainer)
        if batch >= len(train):  # saved as the epoch ended: the next one starts from its beginning
            epoch, batch = epoch + 1, 0
        return {"train_position": {"epoch": epoch, "batch": batch}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("train_position")
        if position is not None:
            self._datasets["train"].set_position(**position)

    def _loader(self, split: str) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class RecDataModule(SplitDataModule):
    """Click data for recommender training: a synthetic model's stream or Criteo logs.

    Every rank gets ``global_batch_size / world_size`` rows per batch and the same number of
    batches (``train_batches``, ``val_batches``, ``test_batches``, per rank, i.e. steps), from data
    no other rank sees. The data sets shard themselves (iterable data sets get no
    ``DistributedSampler``) by the trainer's ``global_rank`` and ``world_size``.

    ``source="synthetic"``: `SyntheticClickDataset` streams of ``synthetic_model`` at ``scale``,
    ``split`` ``"train"``/``"val"``/``"test"`` of one hidden model.

    ``source="criteo"``: ``criteo_dir`` is either a directory `preprocess` wrote or one holding the
    raw TSV files (``day_0``..``day_23`` or ``train.txt``), which `prepare_data` preprocesses once
    into ``criteo_dir/preprocessed`` (with ``criteo_num_embeddings`` rows per table,
    ``criteo_mapping`` and ``skip_malformed``). The last ``test_batches * global_batch_size`` rows
    are the test set, the ``val_batches * global_batch_size`` before them the validation set, and
    training reads the rest (all of it when ``train_batches`` is ``None``) in a shuffled batch order.

    Args:
        source: ``"synthetic"`` or ``"criteo"``.
        synthetic_model: a key of `SYNTHETIC_MODELS`.
        scale: synthetic table rows scale (see `SyntheticModelConfig.tables`).
        global_batch_size: rows per step over all ranks; must divide by the world size.
        train_batches: training batches per rank (required for synthetic data).
        val_batches: validation batches per rank.
        test_batches: test batches per rank.
        seed: seeds the synthetic streams and hidden model, and Criteo's batch order.
        criteo_dir: Criteo data directory (preprocessed or raw).
        criteo_num_embeddings: rows per Criteo table when preprocessing raw files.
        criteo_mapping: ``"modulo"`` or ``"hash"``, how raw hex values become row ids.
        embedding_dim: width of every table `tables` describes (required for Criteo; for synthetic
            models ``None`` keeps Merlin's per-table widths).
        skip_malformed: skip (and count) malformed raw Criteo lines instead of failing.
        num_workers: DataLoader worker processes per rank.

    Example::

        # YAML: data: {class_path: lightning_dembed.data.RecDataModule,
        #              init_args: {synthetic_model: tiny, scale: 0.01, global_batch_size: 8192}}
        data = RecDataModule(synthetic_model="tiny", scale=0.01, global_batch_size=8192)
        tables = data.tables()  # 55 EmbeddingBagConfigs: build the model's EmbeddingBagCollection from them
        data.num_dense_features  # 10
        trainer.fit(model, datamodule=data)  # 2 ranks: 4096 rows per rank and step
    """

    def __init__(
        self,
        source: Literal["synthetic", "criteo"] = "synthetic",
        synthetic_model: str = "tiny",
        scale: float = 1.0,
        global_batch_size: int = 65536,
        train_batches: Optional[int] = 100,
        val_batches: int = 10,
        test_batches: int = 10,
        seed: int = 0,
        criteo_dir: Optional[str] = None,
        criteo_num_embeddings: Optional[int] = None,
        criteo_mapping: Literal["modulo", "hash"] = "modulo",
        embedding_dim: Optional[int] = None,
        skip_malformed: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if source == "synthetic":
            if synthetic_model not in SYNTHETIC_MODELS:
                raise ValueError(
                    f"synthetic_model must be one of {sorted(SYNTHETIC_MODELS)}, got {synthetic_model!r}"
                )
            if train_batches is None:
                raise ValueError("synthetic data needs train_batches: the stream has no end of its own")
        elif source == "criteo":
            if criteo_dir is None:
                raise ValueError("source='criteo' needs criteo_dir")
            if embedding_dim is None:
                raise ValueError("source='criteo' needs embedding_dim, the width of its 26 tables")
        else:
            raise ValueError(f"source must be 'synthetic' or 'criteo', got {source!r}")
        self.save_hyperparameters()
        self.source = source
        self.synthetic_model = synthetic_model
        self.scale = scale
        self.global_batch_size = global_batch_size
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.test_batches = test_batches
        self.seed = seed
        self.criteo_dir = Path(criteo_dir) if criteo_dir is not None else None
        self.criteo_num_embeddings = criteo_num_embeddings
        self.criteo_mapping = criteo_mapping
        self.embedding_dim = embedding_dim
        self.skip_malformed = skip_malformed
        self.num_workers = num_workers
        self._datasets: dict[str, IterableDataset] = {}

    @property
    def num_dense_features(self) -> int:
        if self.source == "synthetic":
            return SYNTHETIC_MODELS[self.synthetic_model].num_dense_features
        return CRITEO_NUM_DENSE

    def tables(self) -> list[EmbeddingBagConfig]:
        """The embedding tables the data's sparse features index, to build the model from."""
        if self.source == "synthetic":
            tables = SYNTHETIC_MODELS[self.synthetic_model].tables(self.scale)
            # Merlin's widths vary per table; models that interact tables pairwise (DLRM) need one.
            if self.embedding_dim is None:
                return tables
            return [replace(table, embedding_dim=self.embedding_dim) for table in tables]
        if (self.criteo_dir / "metadata.json").is_file():
            return ClickDataInfo.load(self.criteo_dir).tables(self.embedding_dim)
        if self.criteo_num_embeddings is None:
            raise ValueError(
                f"{self.criteo_dir} holds raw Criteo files: set criteo_num_embeddings to size their tables"
            )
        return criteo_tables(self.criteo_num_embeddings, self.embedding_dim)

    def _preprocessed_dir(self) -> Path:
        if (self.criteo_dir / "metadata.json").is_file():
            return self.criteo_dir
        return self.criteo_dir / _PREPROCESSED

    def prepare_data(self) -> None:
        """Preprocess raw Criteo files once (Lightning runs this on one process per node)."""
        if self.source != "criteo" or self._preprocessed_dir().exists():
            return
        if not self.criteo_dir.is_dir():
            raise FileNotFoundError(f"criteo_dir {self.criteo_dir} does not exist")
        raw_files = _raw_criteo_files(self.criteo_dir)
        if not raw_files:
            raise FileNotFoundError(
                f"{self.criteo_dir} holds neither preprocessed data (metadata.json) nor Criteo TSV files "
                "(day_0..day_23 or train.txt)"
            )
        if self.criteo_num_embeddings is None:
            raise ValueError(
                f"{self.criteo_dir} holds raw Criteo files: set criteo_num_embeddings to preprocess them"
            )
        info = preprocess(
            raw_files, self._preprocessed_dir(), self.criteo_num_embeddings, self.criteo_mapping,
            self.skip_malformed,
        )
        if info.num_malformed:
            log.warning("skipped %d malformed lines in %s", info.num_malformed, self.criteo_dir)

    def setup(self, stage: str) -> None:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if self.global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} does not divide by the world size {world_size}; "
                f"use a multiple of {world_size}"
            )
        batch_size = self.global_batch_size // world_size
        shard = {"rank": rank, "world_size": world_size}
        if self.source == "synthetic":
            config = SYNTHETIC_MODELS[self.synthetic_model]
            splits = {"train": self.train_batches, "val": self.val_batches, "test": self.test_batches}
            for split, num_batches in splits.items():
                self._datasets[split] = SyntheticClickDataset(
                    config, batch_size, num_batches, self.scale, self.seed, split, **shard,
                )
            return
        path = self._preprocessed_dir()
        num_rows = ClickDataInfo.load(path).num_rows
        test_start = num_rows - self.test_batches * self.global_batch_size
        val_start = test_start - self.val_batches * self.global_batch_size
        if val_start < self.global_batch_size:
            raise ValueError(
                f"{path} has {num_rows} rows: too few for {self.val_batches} validation and "
                f"{self.test_batches} test batches of {self.global_batch_size} rows plus at least one "
                "training batch"
            )
        self._datasets = {
            "train": ClickDataset(
                path, batch_size, (0, val_start), self.train_batches, shuffle=True, seed=self.seed, **shard,
            ),
            "val": ClickDataset(path, batch_size, (val_start, test_start), **shard),
            "test": ClickDataset(path, batch_size, (test_start, num_rows), **shard),
        }

    def _loader(self, split: str) -> DataLoader:
        # The data sets yield whole batches, hence batch_size=None; persistent workers keep each
        # worker's pass counter, which reshuffles Criteo's batch order every epoch.
        return DataLoader(
            self._datasets[split], batch_size=None, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.trainer is not None and self.trainer.strategy.root_device.type == "cuda",
        )


class TaskDataModule(SplitDataModule):
    """Tasks (users, scenarios...) for meta-learning, built once into a task store (`build_task_store`).

    With ``interactions=None`` the interactions come from `SyntheticTaskConfig` (``num_users``
    users with their own tastes); otherwise from a parquet or CSV file with the named columns, or
    an unzipped MovieLens directory, ml-100k, ml-1m, ml-10m or ml-latest (`read_movielens`: each rating
    with the user's and the movie's features). ``side_tables`` joins side-feature tables on by key
    first, e.g. ``{"user_id": "users.parquet", "item_id": "items.csv"}`` (`read_interactions`).
    Training uses the ``train`` tasks; validation and test use the two halves of the ``cold_start``
    tasks (users never seen in training). ``support_size`` and ``query_size`` are rows per task
    (int) or fractions of each task's rows (float); see `build_task_store`.

    ``as_tasks=True`` yields `TaskBatch` meta-batches of ``tasks_per_batch`` tasks per rank (for
    `MetaLearningLoop`). ``as_tasks=False`` yields plain `Batch`es of ``batch_size`` rows of the
    same training tasks, and scores on the cold-start tasks' query rows only, so a model trained
    without meta-learning is measured on exactly the rows a meta-learned one is. ``eval_as_tasks``
    (default: ``as_tasks``) sets validation and test apart: plain training batches with cold-start
    meta-batches scores a plain model as is and fine-tuned on each user's support set
    (`ColdStartEvaluation`), on the same query rows.

    ``reserve_unseen_row`` and ``unseen_task_fraction`` give ids never seen in training (a new
    user's) one shared, trained row instead of an untrained one; ``holdout_seed`` holds out
    another set of tasks per value (None: the same tasks for any ``seed``); see `build_task_store`.

    ``num_embeddings`` sizes the tables: one size for every categorical column, or a size per
    column (``{"user_id": 1024, "item_id": 200000, ...}``, naming each of them), for data whose ids
    span very different ranges (MovieLens' current sets: 610 users, movie ids up to 193,609).

    ``synthetic`` passes settings to `SyntheticTaskConfig` (``heterogeneity``, ``label_noise``...)
    when the interactions are generated.

    Example::

        data = TaskDataModule(store_dir="outputs/tasks", num_users=4000, tasks_per_batch=32)
        model = DLRMModule(data.tables(), num_dense_features=data.num_dense_features, ...)
    """

    def __init__(
        self,
        store_dir: str = "outputs/task_store",
        interactions: Optional[str] = None,
        side_tables: Optional[dict[str, str]] = None,
        num_users: int = 4000,
        task_key: str = "user_id",
        categorical: tuple[str, ...] = ("user_id", "item_id", "category"),
        dense: tuple[str, ...] = ("d0", "d1", "d2", "d3"),
        label: Optional[str] = "label",
        label_rule: Optional[str] = None,
        time_column: Optional[str] = "timestamp",
        split: Literal["time", "random"] = "time",
        support_size: Union[int, float] = 0.5,
        query_size: Optional[Union[int, float]] = None,
        min_rows_per_task: int = 4,
        holdout_fraction: float = 0.2,
        holdout_seed: Optional[int] = None,
        reserve_unseen_row: bool = False,
        unseen_task_fraction: float = 0.0,
        num_embeddings: Union[int, dict[str, int]] = 8192,
        embedding_dim: int = 16,
        as_tasks: bool = True,
        eval_as_tasks: Optional[bool] = None,
        synthetic: Optional[dict[str, Any]] = None,
        tasks_per_batch: int = 32,
        batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.store_dir = Path(store_dir)
        self.table_sizes = table_sizes(num_embeddings, categorical)
        self._datasets: dict[str, IterableDataset] = {}

    def tables(self) -> list[EmbeddingBagConfig]:
        return [
            EmbeddingBagConfig(name=f"t_{c}", num_embeddings=self.table_sizes[c],
                               embedding_dim=self.hparams.embedding_dim, feature_names=[c])
            for c in self.hparams.categorical
        ]

    @property
    def num_dense_features(self) -> int:
        return len(self.hparams.dense)

    def prepare_data(self) -> None:
        h = self.hparams
        source, build_args = self._store_arguments()
        if (self.store_dir / "stats.json").is_file():
            self._check_store_matches(source, build_args)
            return
        if h.interactions is None:
            generator = SyntheticTaskConfig(
                num_users=h.num_users, num_dense=len(h.dense), seed=h.seed, **(h.synthetic or {})
            )
            write_interactions(generator, source)
        build_task_store(source, self.store_dir, **build_args)

    def _store_arguments(self) -> tuple[Path, dict[str, Any]]:
        """The interactions file and `build_task_store`'s arguments this configuration asks for."""
        h = self.hparams
        if h.interactions is None:
            # The generator's settings are in the name, so a store records what generated it.
            settings = "".join(f"_{k}{v}" for k, v in sorted((h.synthetic or {}).items()))
            name = (
                f"{self.store_dir.name}_interactions_{h.num_users}users_{len(h.dense)}dense_seed{h.seed}"
                f"{settings}.parquet"
            )
            source = self.store_dir.with_name(name)
        else:
            source = Path(h.interactions)
        build_args = dict(
            task_key=h.task_key, categorical=list(h.categorical), num_embeddings=self.table_sizes,
            dense=list(h.dense), label=h.label, label_rule=h.label_rule, time_column=h.time_column, split=h.split,
            support_size=h.support_size, query_size=h.query_size, min_rows_per_task=h.min_rows_per_task,
            holdout_fraction=h.holdout_fraction, holdout_seed=h.holdout_seed, seed=h.seed,
            reserve_unseen_row=h.reserve_unseen_row, unseen_task_fraction=h.unseen_task_fraction,
            side_tables=dict(h.side_tables) if h.side_tables else None,
        )
        return source, build_args

    def _check_store_matches(self, source: Path, build_args: dict[str, Any]) -> None:
        """Refuse to train on a store built from other data or settings (it is never overwritten)."""
        asked = json.loads(json.dumps({**build_args, "source": str(source)}))
        built = TaskStore.load(self.store_dir).stats["config"]
        differ = {k: (built.get(k), v) for k, v in asked.items() if built.get(k) != v}
        if differ:
            details = "; ".join(f"{k}: store has {was!r}, config asks {now!r}" for k, (was, now) in differ.items())
            raise ValueError(
                f"the task store {self.store_dir} was built with other settings ({details}). Set data.store_dir "
                "to a new folder, or delete this one to rebuild it"
            )

    def setup(self, stage: str) -> None:
        h = self.hparams
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        shard = {"rank": rank, "world_size": world, "seed": h.seed}
        store = TaskStore.load(self.store_dir)
        train, cold = store.train, store.cold_start
        half = cold.num_tasks // 2
        held_out = {"val": cold.task_range(0, half), "test": cold.task_range(half, cold.num_tasks)}
        self._datasets["train"] = (
            MetaBatchDataset(train, h.tasks_per_batch, **shard)
            if h.as_tasks
            else QueryRowDataset(train, h.batch_size, **shard)
        )
        if h.as_tasks if h.eval_as_tasks is None else h.eval_as_tasks:
            for split, store in held_out.items():
                self._datasets[split] = MetaBatchDataset(
                    store, h.tasks_per_batch, shuffle=False, drop_last=False, **shard
                )
        else:
            for split, store in held_out.items():
                self._datasets[split] = QueryRowDataset(
                    store, h.batch_size, query_only=True, shuffle=False, drop_last=False, **shard
                )

    def _loader(self, split: str) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(self._datasets[split], batch_size=None, num_workers=workers,
                          persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
