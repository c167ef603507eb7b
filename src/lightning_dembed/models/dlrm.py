"""`DLRMModule`: TorchRec's DLRM and DLRM-DCN as a LightningModule, with AUC, log loss and NE."""

from __future__ import annotations

from functools import partial
from typing import Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM, DLRM_DCN

from lightning_dembed.data.batch import Batch
from lightning_dembed.metrics import DEFAULT_AUC_BINS, BinnedAUROC, NormalizedEntropy
from lightning_dembed.modules.discovery import dense_parameters

__all__ = ["DLRMModule"]


class DLRMModule(LightningModule):
    """TorchRec's ``DLRM`` (dot interaction) or ``DLRM_DCN`` (low-rank cross net), trained on click labels.

    The tables are built on the meta device: with `HybridParallelStrategy` each rank materialises
    only its shards. The model is also an ordinary "features in, logits out" module for
    meta-learning: `embed` is the one lookup, and ``forward`` takes either a `KeyedJaggedTensor` or
    the looked-up ``[B, F, D]`` tensor.

    Args:
        tables: embedding tables, all of one width (DLRM interacts them pairwise).
        num_dense_features: width of the dense input.
        dense_arch_layer_sizes: bottom MLP; its last size must equal the tables' ``embedding_dim``.
        over_arch_layer_sizes: top MLP; ends in 1 (the logit).
        interaction: ``"dot"`` for DLRM, ``"dcn"`` for DLRM-DCN.
        dcn_num_layers: cross layers (``"dcn"`` only).
        dcn_low_rank_dim: rank of the cross layers (``"dcn"`` only).
        optimizer: builds the optimizer from parameters (default Adagrad, lr 0.01); the tables train
            with its fused FBGEMM twin.
        auc_bins: validation and test AUC over this many histogram bins (`BinnedAUROC`: fixed memory,
            about 1e-6 from the exact AUC at the default); ``None`` for torchmetrics' exact
            `BinaryAUROC`, which keeps every prediction and gathers them all to every rank.

    Validation and test log ``auc``, ``log_loss`` and ``ne`` (`NormalizedEntropy`: log loss over the
    entropy of the click-through rate; below 1 beats predicting the base rate), over every example
    of every rank.

    Example::

        model = DLRMModule(tables, num_dense_features=13, dense_arch_layer_sizes=[32, 16],
                           over_arch_layer_sizes=[32, 1])
        logits = model(batch.dense_features, batch.sparse_features)  # [B]
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        num_dense_features: int = 13,
        dense_arch_layer_sizes: tuple[int, ...] = (64, 16),
        over_arch_layer_sizes: tuple[int, ...] = (64, 32, 1),
        interaction: Literal["dot", "dcn"] = "dot",
        dcn_num_layers: int = 3,
        dcn_low_rank_dim: int = 32,
        optimizer: OptimizerCallable = torch.optim.Adagrad,
        auc_bins: Optional[int] = DEFAULT_AUC_BINS,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tables", "optimizer"])
        dims = {t.embedding_dim for t in tables}
        if len(dims) != 1 or dims != {dense_arch_layer_sizes[-1]}:
            raise ValueError(
                f"DLRM needs every table and the last dense_arch layer to share one width; tables have "
                f"{sorted(dims)}, dense_arch_layer_sizes ends in {dense_arch_layer_sizes[-1]}. Set the data's "
                "embedding_dim and dense_arch_layer_sizes to match"
            )
        if over_arch_layer_sizes[-1] != 1:
            raise ValueError(f"over_arch_layer_sizes must end in 1 (the logit), got {list(over_arch_layer_sizes)}")
        self.feature_names = [f for t in tables for f in t.feature_names]
        ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        common = dict(
            embedding_bag_collection=ebc,
            dense_in_features=num_dense_features,
            dense_arch_layer_sizes=list(dense_arch_layer_sizes),
            over_arch_layer_sizes=list(over_arch_layer_sizes),
        )
        self.dlrm = (
            DLRM(**common)
            if interaction == "dot"
            else DLRM_DCN(**common, dcn_num_layers=dcn_num_layers, dcn_low_rank_dim=dcn_low_rank_dim)
        )
        self.optimizer_factory = optimizer
        make_auc = BinaryAUROC if auc_bins is None else partial(BinnedAUROC, auc_bins)
        self.val_auc, self.test_auc = make_auc(), make_auc()
        self.val_ne, self.test_ne = NormalizedEntropy(), NormalizedEntropy()

    def embed(self, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """The embedding lookup: ``[B, F, D]``."""
        return self.dlrm.sparse_arch(sparse_features)

    def forward(
        self, dense_features: torch.Tensor, sparse_features: Union[KeyedJaggedTensor, torch.Tensor]
    ) -> torch.Tensor:
        embedded = self.embed(sparse_features) if isinstance(sparse_features, KeyedJaggedTensor) else sparse_features
        dense = self.dlrm.dense_arch(dense_features)
        interacted = self.dlrm.inter_arch(dense_features=dense, sparse_features=embedded)
        return self.dlrm.over_arch(interacted).squeeze(-1)

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch.dense_features, batch.sparse_features)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch.labels), logits

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.labels.numel())
        return loss

    def _evaluate(
        self, batch: Batch, stage: str, auc: Union[BinnedAUROC, BinaryAUROC], ne: NormalizedEntropy
    ) -> None:
        loss, logits = self._loss(batch)
        auc.update(torch.sigmoid(logits), batch.labels.long())
        ne.update(logits, batch.labels)
        # log loss is the mean BCE over every example of every rank
        self.log(f"{stage}/log_loss", loss, sync_dist=True, batch_size=batch.labels.numel())
        self.log(f"{stage}/auc", auc, batch_size=batch.labels.numel())
        self.log(f"{stage}/ne", ne, batch_size=batch.labels.numel())

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_auc, self.val_ne)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_auc, self.test_ne)

    def predict_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self(batch.dense_features, batch.sparse_features))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(dense_parameters(self))

