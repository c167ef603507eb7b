from lightning_dembed.strategies.hybrid_parallel import HybridParallelStrategy

__all__ = ["HybridParallelStrategy"]
