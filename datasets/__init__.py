"""Dataset readers (``wsolbench.datasets``): one module per dataset, all returning ``base.Sample``s.

Importing this package is light: loaders are imported on first use through the registry's lazy entries
(``BUILTIN_DATASETS`` below lists them as ``"module:Class"`` strings).
"""
from .base import DatasetError, Phrase, Sample, Task, WSOLDataset

BUILTIN_DATASETS: dict[str, str] = {
    "cub": "wsolbench.datasets.cub:CUB200",
    "ilsvrc": "wsolbench.datasets.ilsvrc:ILSVRC",
    "openimages": "wsolbench.datasets.openimages:OpenImages30k",
    "voc": "wsolbench.datasets.voc:VOC2012",
    "coco": "wsolbench.datasets.coco:COCO2014",
    "flickr30k": "wsolbench.datasets.flickr30k:Flickr30kEntities",
    "synthetic-cub": "wsolbench.datasets.cub:SyntheticCUB",
    "synthetic-ilsvrc": "wsolbench.datasets.ilsvrc:SyntheticILSVRC",
    "synthetic-openimages": "wsolbench.datasets.openimages:SyntheticOpenImages",
    "synthetic-voc": "wsolbench.datasets.voc:SyntheticVOC",
    "synthetic-coco": "wsolbench.datasets.coco:SyntheticCOCO",
    "synthetic-flickr30k": "wsolbench.datasets.flickr30k:SyntheticFlickr30k",
}

__all__ = ["BUILTIN_DATASETS", "DatasetError", "Phrase", "Sample", "Task", "WSOLDataset"]
