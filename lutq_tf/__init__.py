"""LUT-Q for Keras 3: weights as look-up tables, trained with `model.fit`.

Cardinaux et al., "Iteratively Training Look-Up Tables for Network
Quantization" (arXiv 1811.05355).
"""

from lutq_tf import constraints
from lutq_tf.loading import load_model
from lutq_tf.model import LUTQModel
from lutq_tf.model import LUTQModelMixin
from lutq_tf.model import LUTQSequential
from lutq_tf.model import NonFiniteWeightsError
from lutq_tf.model import lutq_layers
from lutq_tf.quantize import quantize_model
from lutq_tf.quantize import strip_model
from lutq_tf.quantizer import LUTQuantizer
from lutq_tf.registry import SUPPORTED_LAYERS
from lutq_tf.summary import TensorSummary
from lutq_tf.summary import summary
from lutq_tf.wrapper import LUTQWrapper

__version__ = "0.1.0"


def is_quantized(model):
    """True if `model` has LUT-Q layers."""
    return bool(lutq_layers(model))
