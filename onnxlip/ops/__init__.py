"""Op families. Importing this package registers every rule (see registry.py)."""

from . import activations, affine, combine, einsum, interpolate, layout, linear, lipschitz_only, pooling  # noqa: F401  (registration)
from .registry import IMPORTERS, LIPSCHITZ_IMPORTERS, OPS, REJECTED

__all__ = ["IMPORTERS", "LIPSCHITZ_IMPORTERS", "OPS", "REJECTED"]
