"""tflite_export: LUT-Q Keras models to TFLite for Microcontrollers.

Weights that are look-up tables (`Q = d[A]`) are stored the way TFLM's
DECODE op reads them: bit-packed indices plus value tables.

    result = tflite_export.export(model, "model.tflite", representative_data=x,
                                  target="cortex-m4-cmsis-nn")
    print(result)
"""

from tflite_export.device.evaluate import tflm_accuracy
from tflite_export.device.evaluate import tflm_predict
from tflite_export.device.target import PROFILES
from tflite_export.device.target import Target
from tflite_export.errors import ExportError
from tflite_export.errors import UnsupportedModelError
from tflite_export.errors import VerificationError
from tflite_export.exporter import export
from tflite_export.pipeline.c_array import matches as c_array_matches
from tflite_export.pipeline.verify import Verification
from tflite_export.planning.planner import Plan
from tflite_export.planning.planner import plan_budget
from tflite_export.result import ExportResult
from tflite_export.result import RamChoice
from tflite_export.result import RamReport
from tflite_export.result import TensorReport

__all__ = [
    "ExportError",
    "ExportResult",
    "PROFILES",
    "Plan",
    "RamChoice",
    "RamReport",
    "Target",
    "TensorReport",
    "UnsupportedModelError",
    "Verification",
    "VerificationError",
    "c_array_matches",
    "export",
    "plan_budget",
    "tflm_accuracy",
    "tflm_predict",
]
