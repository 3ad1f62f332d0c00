"""The export pipeline: a Keras model to a verified .tflite file.

Converts with TF's converter, maps the file's tensors back to the Keras
kernels, writes LUT weights for TFLM's DECODE (or native int4), slims what
TFLM never reads, sizes the arena and checks bit-exactness. Imports no other
subpackage.
"""
