"""A tiny recommender and its data, shared by the distributed tests and their single-process references."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    JaggedTensor,
    KeyedJaggedTensor,
    PoolingType,
)
from torchrec.datasets.utils import Batch

from lightning_dembed import dense_parameters

TABLES = [
    # name, rows, dim: sizes differ so that every sharding type has something to split
    ("t0", 64, 8),
    ("t1", 40, 16),
    ("t2", 96, 8),
    ("t3", 24, 4),
]
NUM_DENSE = 3
SEQUENCE_DIM = 8  # an EmbeddingCollection's tables share one width
HOTNESS = 2


def tables(pooling: PoolingType = PoolingType.SUM) -> list[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=[f"f_{n}"], pooling=pooling)
            for n, r, d in TABLES]


def bag_sums(sequences: JaggedTensor, rows: int, dim: int) -> torch.Tensor:
    """``[rows, dim]``: the embeddings of each row's ids summed (what sum pooling does, in the model)."""
    row_of_id = torch.repeat_interleave(torch.arange(rows), sequences.lengths())
    return torch.zeros(rows, dim).index_add(0, row_of_id, sequences.values())


class TinyRecModule(LightningModule):
    """EmbeddingBagCollection + MLP, trained with the optimizer named in ``optimizer``.

    With ``weighted`` every id comes with a weight. With ``lookups`` > 1 the forward looks the ids up
    that many times. With ``sequence`` the tables are an `EmbeddingCollection` (in ``self.ebc`` all the same), all
    ``SEQUENCE_DIM`` wide, whose per-id embeddings the model sums per row itself.
    """

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, device: str = "cpu", scheduler: str = "none",
                 groups: bool = False, frozen_table: str | None = None, mean_pooling: bool = False,
                 sequence: bool = False, lookups: int = 1, weighted: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        if sequence:
            configs = [EmbeddingConfig(name=n, num_embeddings=r, embedding_dim=SEQUENCE_DIM, feature_names=[f"f_{n}"])
                       for n, r, _ in TABLES]
            self.ebc = EmbeddingCollection(tables=configs, device=torch.device(device))
        else:
            pooling = PoolingType.MEAN if mean_pooling else PoolingType.SUM
            self.ebc = EmbeddingBagCollection(tables=tables(pooling), is_weighted=weighted, device=torch.device(device))
        if frozen_table:
            self.ebc.embedding_bags[frozen_table].weight.requires_grad_(False)
        width = (SEQUENCE_DIM * len(TABLES) if sequence else sum(d for _, _, d in TABLES)) + NUM_DENSE
        self.mlp = nn.Sequential(nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, 1))
        self.losses: list[float] = []

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        if self.hparams.sequence:
            sequences = self.ebc(sparse)
            pooled = torch.cat([bag_sums(sequences[f"f_{n}"], dense.shape[0], SEQUENCE_DIM) for n, _, _ in TABLES], dim=1)
        else:
            # lookups > 1: the tables looked up that many times per step (weighted 1, 1/2, ...).
            pooled = sum(self.ebc(sparse).values() / (i + 1) for i in range(self.hparams.lookups))
        return self.mlp(torch.cat([dense, pooled], dim=1)).squeeze(1)

    def loss(self, batch: Batch) -> torch.Tensor:
        logits = self(batch.dense_features, batch.sparse_features)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)

    nan_at: int | None = None  # a step whose loss is made NaN (the non-finite loss guard's test)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        if self.nan_at is not None and self.global_step == self.nan_at and self.global_rank == 0:
            loss = loss * float("nan")
        self.losses.append(float(loss))
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch), sync_dist=True)

    def predict_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch.dense_features, batch.sparse_features))

    def configure_optimizers(self):
        h = self.hparams
        # groups: the tables in a group of their own, with 4x the dense learning rate.
        params = [{"params": self.mlp.parameters()}, {"params": self.ebc.parameters(), "lr": 4 * h.lr}] if h.groups \
            else self.parameters()
        if h.optimizer == "adagrad":
            optimizer = torch.optim.Adagrad(params, lr=h.lr, eps=1e-8)
        elif h.optimizer == "adamw-dense":  # the tables in no group: they follow its first group
            optimizer = torch.optim.AdamW(dense_parameters(self), lr=h.lr)
        elif h.optimizer == "sgd-first-layer":  # the tables and the last layer in no group: refused
            optimizer = torch.optim.SGD(self.mlp[0].parameters(), lr=h.lr)
        else:
            optimizer = torch.optim.SGD(params, lr=h.lr)
        if h.scheduler == "none":
            return optimizer
        interval, scheduler = SCHEDULERS[h.scheduler](optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": "train_loss"}}


SCHEDULERS = {
    "step": lambda opt: ("step", torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)),
    "epoch": lambda opt: ("epoch", torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.3)),
    "warmup": lambda opt: ("step", torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (step + 1) / 4)),
    "warmup0": lambda opt: ("step", torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 4)),  # from lr 0
    "onecycle": lambda opt: ("step", torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[0.5 * g["lr"] for g in opt.param_groups], total_steps=12, cycle_momentum=False)),
    # mode="max" on a loss: the lr halves whenever the loss does not rise (most steps).
    "plateau": lambda opt: ("step", torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)),
}


def make_batch(seed: int, size: int, weighted: bool = False) -> Batch:
    g = torch.Generator().manual_seed(seed)
    keys = [f"f_{n}" for n, _, _ in TABLES]
    values = torch.cat([torch.randint(r, (size * HOTNESS,), generator=g) for _, r, _ in TABLES])
    lengths = torch.full((len(TABLES) * size,), HOTNESS, dtype=torch.int64)
    dense = torch.randn(size, NUM_DENSE, generator=g)
    labels = torch.randint(2, (size,), generator=g).float()
    weights = torch.rand(values.numel(), generator=g) if weighted else None  # drawn last: the rest is as unweighted
    return Batch(
        dense_features=dense,
        sparse_features=KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights),
        labels=labels,
    )


def rank_slice(batch: Batch, rank: int, world_size: int, split: list[int] | None = None) -> Batch:
    """A rank's contiguous share of a global batch: equal shares, or ``split[r]`` rows for rank r."""
    split = split or [batch.labels.numel() // world_size] * world_size
    start = sum(split[:rank])
    size = split[rank]
    rows = slice(start, start + size)
    kjt = batch.sparse_features
    per_key = [kjt[k] for k in kjt.keys()]
    ids = slice(rows.start * HOTNESS, rows.stop * HOTNESS)
    values = torch.cat([jt.values()[ids] for jt in per_key])
    weights = torch.cat([jt.weights()[ids] for jt in per_key]) if kjt.weights_or_none() is not None else None
    lengths = torch.full((len(per_key) * size,), HOTNESS, dtype=torch.int64)
    return Batch(
        dense_features=batch.dense_features[rows],
        sparse_features=KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=lengths, weights=weights),
        labels=batch.labels[rows],
    )


class GlobalBatches(torch.utils.data.IterableDataset):
    """The same global batches on every rank, each rank taking its slice."""

    def __init__(self, steps: int, global_size: int, rank: int, world_size: int, seed: int = 0,
                 split: list[int] | None = None, weighted: bool = False) -> None:
        self.steps, self.global_size, self.rank, self.world_size, self.seed = steps, global_size, rank, world_size, seed
        self.split, self.weighted = split, weighted

    def __iter__(self):
        for step in range(self.steps):
            batch = make_batch(self.seed + step, self.global_size, self.weighted)
            yield rank_slice(batch, self.rank, self.world_size, self.split)


class SizedGlobalBatches(GlobalBatches):
    """`GlobalBatches` that also say how many they are."""

    def __len__(self) -> int:
        return self.steps


def reference_run(steps: int, global_size: int, optimizer: str, lr: float, seed: int = 0, init_seed: int = 0,
                  split: list[int] | None = None, dense_clip: float | None = None, scheduler: str = "none",
                  groups: bool = False, steps_per_epoch: int | None = None, frozen_table: str | None = None,
                  mean_pooling: bool = False, sequence: bool = False, lookups: int = 1, weighted: bool = False,
                  new_optimizer_at: int | None = None, fresh_tables_at: tuple[int, list[str]] | None = None):
    """Plain single-process training on the global batches, as DDP would train: losses and final state.

    With ``new_optimizer_at`` the optimizer is built anew (fresh state) before that step, as a second
    ``fit`` does; with ``fresh_tables_at`` = (step, tables) only those tables' state starts anew.
    With ``split`` (rows per rank) the loss is the mean over ranks of each rank's mean loss (DDP
    averages gradients over ranks, whatever their row counts; an empty rank contributes zeros).
    """
    torch.manual_seed(init_seed)
    module = TinyRecModule(optimizer=optimizer, lr=lr, scheduler=scheduler, groups=groups, frozen_table=frozen_table,
                           mean_pooling=mean_pooling, sequence=sequence, lookups=lookups, weighted=weighted)
    configured = module.configure_optimizers()
    opt, sched = (configured["optimizer"], configured["lr_scheduler"]) if isinstance(configured, dict) \
        else (configured, None)
    losses = []
    for step in range(steps):
        if step == new_optimizer_at:
            opt = module.configure_optimizers()
        if fresh_tables_at is not None and step == fresh_tables_at[0]:
            for name in fresh_tables_at[1]:
                table = module.ebc.embedding_bags[name].weight
                opt.state[table] = type(opt)([table], **opt.defaults).state[table]
        opt.zero_grad()
        # Every epoch replays the same ``steps_per_epoch`` batches, as GlobalBatches does.
        batch = make_batch(seed + (step % steps_per_epoch if steps_per_epoch else step), global_size, weighted)
        if split is None:
            loss = module.loss(batch)
        else:
            parts = [module.loss(rank_slice(batch, r, len(split), split)) for r in range(len(split)) if split[r]]
            loss = sum(parts) / len(split)
        loss.backward()
        if dense_clip is not None:
            torch.nn.utils.clip_grad_value_(module.mlp.parameters(), dense_clip)
        opt.step()
        if sched is not None and (sched["interval"] == "step" or (step + 1) % steps_per_epoch == 0):
            scheduler = sched["scheduler"]
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(float(loss))
            else:
                scheduler.step()
        losses.append(float(loss))
    return losses, {k: v.detach().clone() for k, v in module.state_dict().items()}


META_FEATURES = ["user", "item", "category"]
META_DIM = 8


class TinyMetaModule(LightningModule):
    """The meta-learning contract: embed() is the one lookup; forward takes its [R, F, D] output."""

    def __init__(self, lr: float = 0.1, device: str = "cpu") -> None:
        super().__init__()
        self.feature_names = META_FEATURES
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=f"t_{f}", num_embeddings=30, embedding_dim=META_DIM, feature_names=[f])
                    for f in META_FEATURES],
            device=torch.device(device),
        )
        self.bottom = nn.Linear(NUM_DENSE, META_DIM)
        self.over_arch = nn.Sequential(nn.Linear(META_DIM * (len(META_FEATURES) + 1), 8), nn.Tanh(), nn.Linear(8, 1))
        self.lr = lr

    def embed(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(features).values().reshape(-1, len(META_FEATURES), META_DIM)

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        embedded = self.embed(sparse) if isinstance(sparse, KeyedJaggedTensor) else sparse
        return self.over_arch(torch.cat([torch.tanh(self.bottom(dense)), embedded.flatten(-2)], -1)).squeeze(-1)

    def training_step(self, batch, batch_idx):  # replaced by MetaLearningLoop
        raise AssertionError("MetaLearningLoop should have installed its own training step")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ColdStartTinyModule(TinyMetaModule):
    """`TinyMetaModule` scored by `ColdStartEvaluation` (with these arguments) in validation."""

    EVALUATION = {"inner_steps": 2, "inner_lr": 0.3, "adapt": ["over_arch"], "adapt_embeddings": ["user"]}

    def validation_step(self, batch, batch_idx):  # replaced by ColdStartEvaluation
        raise AssertionError("ColdStartEvaluation should have installed its own validation step")


def meta_tasks(seed: int, num_tasks: int):
    """Tasks of different sizes: (dense, ids [rows, F], labels, support size) each."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(num_tasks):
        rows = int(torch.randint(4, 9, (1,), generator=g))
        tasks.append((torch.randn(rows, NUM_DENSE, generator=g), torch.randint(30, (rows, len(META_FEATURES)), generator=g),
                      torch.randint(2, (rows,), generator=g).float(), int(torch.randint(2, rows - 1, (1,), generator=g))))
    return tasks


def task_batch(tasks):
    from lightning_dembed.data import TaskBatch

    ids = torch.cat([t[1] for t in tasks])
    rows = ids.shape[0]
    sizes = torch.tensor([t[0].shape[0] for t in tasks])
    return TaskBatch(
        dense_features=torch.cat([t[0] for t in tasks]),
        sparse_features=KeyedJaggedTensor(keys=META_FEATURES, values=ids.t().reshape(-1),
                                          lengths=torch.ones(rows * len(META_FEATURES), dtype=torch.int64)),
        labels=torch.cat([t[2] for t in tasks]),
        task_offsets=torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]),
        support_sizes=torch.tensor([t[3] for t in tasks]),
        task_keys=torch.arange(len(tasks)),
    )


class MetaBatches(torch.utils.data.IterableDataset):
    """Global meta-batch ``step`` has ``num_tasks`` tasks; rank r takes tasks r, r + world, ..."""

    def __init__(self, steps: int, num_tasks: int, rank: int, world_size: int) -> None:
        self.steps, self.num_tasks, self.rank, self.world_size = steps, num_tasks, rank, world_size

    def __len__(self) -> int:  # sized, as the shipped task loaders: trained pipelined
        return self.steps

    def __iter__(self):
        for step in range(self.steps):
            yield task_batch(meta_tasks(step, self.num_tasks)[self.rank:: self.world_size])


def meta_reference_run(steps: int, num_tasks: int, config, lr: float, init_seed: int = 0):
    """Single process, plain tables, autograd through the inner loop: losses and final weights."""
    from lightning_dembed.meta import meta_step

    torch.manual_seed(init_seed)
    module = TinyMetaModule(lr=lr)
    opt = module.configure_optimizers()
    losses = []
    for step in range(steps):
        batch = task_batch(meta_tasks(step, num_tasks))
        opt.zero_grad()
        params = {n: p for n, p in module.named_parameters() if config.adapts(n)}
        out = meta_step(module, params, batch.dense_features, module.embed(batch.sparse_features), batch.labels,
                        batch.task_offsets, batch.support_sizes, config, META_FEATURES)
        out.query_loss.backward()
        opt.step()
        losses.append(float(out.query_loss))
    return losses, {k: v.detach().clone() for k, v in module.state_dict().items()}
