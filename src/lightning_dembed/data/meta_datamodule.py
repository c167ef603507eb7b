"""`TaskDataModule`: task-grouped data for meta-learning, or the same rows as plain batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from torch.utils.data import DataLoader, IterableDataset
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from lightning_dembed.data.datamodule import SplitDataModule
from lightning_dembed.data.meta_io import MetaBatchDataset, QueryRowDataset, TaskStore, build_task_store
from lightning_dembed.data.tasks import SyntheticTaskConfig, write_interactions

__all__ = ["TaskDataModule"]


class TaskDataModule(SplitDataModule):
    """Tasks (users, scenarios...) for meta-learning, built once into a Meta-IO task store.

    With ``interactions=None`` the interactions come from `SyntheticTaskConfig` (``num_users``
    users with their own tastes); otherwise from a parquet or CSV file with the named columns, or
    an unzipped MovieLens ml-100k / ml-1m directory (`read_movielens`: each rating with the user's
    and the movie's features). ``side_tables`` joins side-feature tables on by key first, e.g.
    ``{"user_id": "users.parquet", "item_id": "items.csv"}`` (`read_interactions`).
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
    user's) one shared, trained row instead of an untrained one; see `build_task_store`.

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
        reserve_unseen_row: bool = False,
        unseen_task_fraction: float = 0.0,
        num_embeddings: int = 8192,
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
        self._datasets: dict[str, IterableDataset] = {}

    def tables(self) -> list[EmbeddingBagConfig]:
        return [
            EmbeddingBagConfig(name=f"t_{c}", num_embeddings=self.hparams.num_embeddings,
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
            task_key=h.task_key, categorical=list(h.categorical), num_embeddings={c: h.num_embeddings for c in h.categorical},
            dense=list(h.dense), label=h.label, label_rule=h.label_rule, time_column=h.time_column, split=h.split,
            support_size=h.support_size, query_size=h.query_size, min_rows_per_task=h.min_rows_per_task,
            holdout_fraction=h.holdout_fraction, seed=h.seed,
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
