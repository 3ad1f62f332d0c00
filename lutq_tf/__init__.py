"""LUT-Q for Keras 3: weights as look-up tables, trained with `model.fit`.

Cardinaux et al., "Iteratively Training Look-Up Tables for Network
Quantization" (arXiv 1811.05355).
"""

# First: every other module imports TensorFlow-only code.
from lutq_tf.backend import check_tensorflow_backend

check_tensorflow_backend()

from lutq_tf import callbacks  # noqa: E402
from lutq_tf import constraints  # noqa: E402
from lutq_tf.batchnorm import fold_batchnorm  # noqa: E402
from lutq_tf.batchnorm import reestimate_batchnorm  # noqa: E402
from lutq_tf.loading import load_model  # noqa: E402
from lutq_tf.model import LUTQModel  # noqa: E402
from lutq_tf.model import LUTQModelMixin  # noqa: E402
from lutq_tf.model import LUTQSequential  # noqa: E402
from lutq_tf.model import NonFiniteWeightsError  # noqa: E402
from lutq_tf.model import lutq_layers  # noqa: E402
from lutq_tf.pruning import erk_prune_overrides  # noqa: E402
from lutq_tf.quantize import quantize_model  # noqa: E402
from lutq_tf.quantize import strip_model  # noqa: E402
from lutq_tf.quantizer import GRANULARITIES  # noqa: E402
from lutq_tf.quantizer import LUTQuantizer  # noqa: E402
from lutq_tf.registry import SUPPORTED_LAYERS  # noqa: E402
from lutq_tf.registry import all_layers  # noqa: E402
from lutq_tf.summary import TensorSummary  # noqa: E402
from lutq_tf.summary import summary  # noqa: E402
from lutq_tf.summary import summary_rows  # noqa: E402
from lutq_tf.wrapper import LUTQWrapper  # noqa: E402

__version__ = "0.1.0"


def is_quantized(model) -> bool:
    """True if `model` has LUT-Q layers."""
    return bool(lutq_layers(model))
