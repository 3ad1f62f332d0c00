import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from hypothesis import settings  # noqa: E402
import pytest  # noqa: E402

# Property tests draw the same examples on every run, so CI is reproducible;
# `HYPOTHESIS_PROFILE=explore` searches with fresh random examples instead.
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    # Imported here, not above: under pytest-xdist the controlling process
    # loads this file but runs no test, so it never imports TensorFlow.
    import keras

    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
