"""The Keras backend guard: lutq_tf runs on Keras' TensorFlow backend only.

The wrapper's forward pass is a `tf.custom_gradient`, its k-means step an XLA
`tf.function` and its models override the TensorFlow trainer's hooks, so any
other backend would fail later with an error that does not say why.
"""

import keras


def check_tensorflow_backend(what="lutq_tf"):
    """Raises ImportError unless Keras runs on its TensorFlow backend.

    Args:
        what: what needs the backend, for the message.
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(
            f"{what} needs Keras' TensorFlow backend, but Keras is running "
            f"on '{backend}' (set by the KERAS_BACKEND environment variable "
            "or ~/.keras/keras.json). Set KERAS_BACKEND=tensorflow before "
            "Keras is first imported, or call "
            "keras.config.set_backend('tensorflow')."
        )
