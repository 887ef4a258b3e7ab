"""wsolbench: one interface, registry and metric suite for weakly supervised object localization."""
from .registry import (create_dataset, create_method, list_datasets, list_methods, register_dataset,
                       register_method)

__version__ = "0.1.0"
__all__ = ["create_dataset", "create_method", "list_datasets", "list_methods", "register_dataset",
           "register_method", "__version__"]
