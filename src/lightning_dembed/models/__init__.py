"""LightningModules for the recipes."""

from lightning_dembed.models.dlrm import DLRMModule

__all__ = ["DLRMModule"]
