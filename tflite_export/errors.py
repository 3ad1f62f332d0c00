"""Exceptions raised by `tflite_export`.

Bad arguments raise `ValueError` (or `TypeError`); these classes cover the
failures that happen while converting, compressing or checking a model.
"""


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message says why and what to do."""


class VerificationError(ExportError):
    """The exported model does not compute what it should; nothing was written."""


class UnsupportedModelError(ExportError):
    """TFLM cannot run the converted graph; nothing was written.

    An op without a TFLM kernel, or beyond a kernel's limits (a
    CONCATENATION of more than 10 inputs); the message names the op.
    """
