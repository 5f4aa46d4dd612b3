"""Op families. Importing this package registers every rule (see registry.py)."""

from . import activations, combine, layout, linear, pooling  # noqa: F401  (registration side effects)
from .registry import IMPORTERS, OPS, REJECTED

__all__ = ["IMPORTERS", "OPS", "REJECTED"]
