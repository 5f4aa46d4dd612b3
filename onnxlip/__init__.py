"""onnxlip: path-norms, path-metrics and certified Lipschitz bounds of exported ONNX ReLU networks."""

import os as _os

# onnxruntime 1.31 writes a device id and a usage database under ~/.cache/Microsoft on import (its telemetry); an
# audit tool should not. Set before onnxruntime is first imported; a user's own setting stands.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .api import (
    BoundResult,
    PathMetricResult,
    PathNormResult,
    VariantError,
    bound,
    bound_many,
    path_metric,
    path_norm,
)
from .checking import CheckResult, check
from .errors import MismatchError, ModelIssue, ModelLoadError, OnnxlipError, ShapeError, UnsupportedModelError
from .importer import ImportOptions, import_model
from .lipschitz import LipschitzResult, lipschitz
from .prune import PruneResult, prune
from .rescale import RescaleResult, rescale
from .scores import ScoresResult, scores

__version__ = "0.1.0"

__all__ = [
    "BoundResult",
    "VariantError",
    "CheckResult",
    "PathMetricResult",
    "PathNormResult",
    "PruneResult",
    "LipschitzResult",
    "lipschitz",
    "RescaleResult",
    "rescale",
    "ScoresResult",
    "bound",
    "bound_many",
    "check",
    "path_metric",
    "path_norm",
    "prune",
    "scores",
    "import_model",
    "ImportOptions",
    "OnnxlipError",
    "UnsupportedModelError",
    "ModelLoadError",
    "ShapeError",
    "MismatchError",
    "ModelIssue",
]
