import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from lightning_dembed import dense_parameters  # importing it registers strategy="hybrid_parallel"

FEATURES = ["user", "item", "category", "city"]


class ClickModel(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        tables = [
            EmbeddingBagConfig(name=f"t_{f}", num_embeddings=10_000, embedding_dim=16, feature_names=[f])
            for f in FEATURES
        ]
        # Built on the meta device: each process materialises only the shards it holds.
        self.embeddings = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        self.mlp = nn.Sequential(nn.Linear(16 * len(FEATURES), 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.mlp(self.embeddings(features).values()).squeeze(1)

    def training_step(self, batch, batch_idx):
        features, labels = batch
        loss = nn.functional.binary_cross_entropy_with_logits(self(features), labels)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # The MLP gets this Adagrad; the tables (in no group) its fused FBGEMM twin, same lr and
        # schedule, applied inside backward. Put tables in a param group to give them their own.
        return torch.optim.Adagrad(dense_parameters(self), lr=0.05)


def batches(steps: int = 50, batch_size: int = 256):
    for _ in range(steps):
        ids = torch.randint(10_000, (len(FEATURES) * batch_size,))
        lengths = torch.ones(len(FEATURES) * batch_size, dtype=torch.long)
        labels = (ids[:batch_size] % 2).float()  # clicks depend on the user id
        yield KeyedJaggedTensor(keys=FEATURES, values=ids, lengths=lengths), labels


if __name__ == "__main__":
    trainer = Trainer(strategy="hybrid_parallel", accelerator="cpu", devices=2, max_epochs=3)
    # Each process gets its share of the batches (Lightning adds a DistributedSampler).
    trainer.fit(ClickModel(), torch.utils.data.DataLoader(list(batches()), batch_size=None))
