"""Dataset readers (``wsolbench.datasets``): one module per dataset, all returning ``base.Sample``s.

Importing this package is light: loaders are imported on first use through the registry's lazy
``"module:Class"`` entries (``wsolbench.registry.DATASETS``).
"""
from .base import DatasetError, Phrase, Sample, Task, WSOLDataset

__all__ = ["DatasetError", "Phrase", "Sample", "Task", "WSOLDataset"]
