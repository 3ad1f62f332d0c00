"""Data loaders for the examples and benchmarks.

Every loader returns `(x_train, y_train), (x_test, y_test)` as numpy arrays:

- images: float32, scaled to [0, 1], channels-last (NHWC);
- labels: int32 class indices of shape `(N,)`.

Nothing here downloads by default except when `data_dir=None` is passed to
`load_mnist` / `load_cifar10`, which then falls back to `keras.datasets`
(needs internet). `load_digits` is bundled with scikit-learn and works
offline: it is the default for quick starts and tests.
"""

import hashlib
import io
import os
import pickle
import re
import tarfile
import warnings

import numpy as np

# CIFAR-10 label order (the index is the label). This list happens to be
# alphabetical too, but the loader never relies on that: labels come from
# this list, not from sorting folder names.
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Seed of the shuffle applied before `limit` takes the first n samples.
_LIMIT_SEED = 0


# ---------------------------------------------------------------------------
# Digits (scikit-learn, offline)
# ---------------------------------------------------------------------------


def load_digits(test_fraction=0.25, seed=0):
    """Loads scikit-learn's bundled 8x8 handwritten digits (1797 images).

    Args:
        test_fraction: fraction of the samples held out for the test split,
            in (0, 1). The split is stratified by class.
        seed: seed of the (deterministic) split.

    Returns:
        `(x_train, y_train), (x_test, y_test)`; images of shape
        `(N, 8, 8, 1)` float32 in [0, 1] (pixel values 0..16 divided by 16),
        labels `(N,)` int32 in 0..9. With the defaults: 1347 train and
        450 test samples.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(
            f"`test_fraction` must be in (0, 1), got {test_fraction!r}."
        )
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the env
        raise ImportError(
            "`load_digits` needs scikit-learn: `pip install scikit-learn` "
            "(or install the project with the `examples` extra)."
        ) from e

    digits = _sk_load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., np.newaxis]
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------


def load_mnist(data_dir=None, limit=None):
    """Loads MNIST (28x28 grey digits, 60000 train / 10000 test).

    Args:
        data_dir: path to an `mnist.npz` file (keys `x_train`, `y_train`,
            `x_test`, `y_test`, the layout of `keras.datasets.mnist`), or to
            a directory containing `mnist.npz`. `None` downloads it with
            `keras.datasets.mnist.load_data()`, which needs internet.
        limit: optional int; keep only the first `limit` samples of each
            split after a fixed shuffle (for quick runs).

    Returns:
        `(x_train, y_train), (x_test, y_test)`; images `(N, 28, 28, 1)`
        float32 in [0, 1], labels `(N,)` int32.
    """
    if limit is not None:
        _check_limit(limit)
    if data_dir is None:
        try:
            import keras

            (x_train, y_train), (x_test, y_test) = (
                keras.datasets.mnist.load_data()
            )
        except Exception as e:
            raise RuntimeError(
                "Could not download MNIST with keras.datasets "
                f"({type(e).__name__}: {e}). Pass a local copy instead: "
                "`data_dir=` (or `--data_dir` on the command line) pointing "
                "at an `mnist.npz` file or a directory containing one."
            ) from e
    else:
        path = _existing_path(data_dir, "data_dir")
        if os.path.isdir(path):
            candidate = os.path.join(path, "mnist.npz")
            if not os.path.isfile(candidate):
                raise FileNotFoundError(
                    f"`data_dir` is a directory without `mnist.npz`: {path!r}. "
                    "Pass the path of an .npz file with keys x_train, y_train, "
                    "x_test, y_test, or a directory containing `mnist.npz`."
                )
            path = candidate
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise ValueError(
                f"`data_dir` {path!r} is not a readable .npz file ({e})."
            ) from e
        missing = [
            k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays
        ]
        if missing:
            raise ValueError(
                f"`data_dir` file {path!r} lacks the keys {missing}; an MNIST "
                ".npz needs x_train, y_train, x_test and y_test."
            )
        x_train, y_train = arrays["x_train"], arrays["y_train"]
        x_test, y_test = arrays["x_test"], arrays["y_test"]

    out = []
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[..., np.newaxis]
        if x.shape[1:] != (28, 28, 1) or len(x) != len(y):
            raise ValueError(
                f"MNIST {name} images must have shape (N, 28, 28) with one "
                f"label each; got images {x.shape} and {len(y)} labels."
            )
        out.append(_finish(x, y, limit))
    return tuple(out)


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------


def load_cifar10(data_dir=None, limit=None, cache=True):
    """Loads CIFAR-10 (32x32 RGB, 10 classes, 50000 train / 10000 test).

    Accepted `data_dir` layouts:

    - the original python version: a `cifar-10-batches-py` directory with
      `data_batch_1` .. `data_batch_5` and `test_batch` (or its parent, or
      the `cifar-10-python.tar.gz` archive itself). These are pickles: only
      load copies you trust;
    - an image-folder tree `train/<class>/*.jpg|jpeg|png` and
      `test/<class>/*`, where `<class>` is a CIFAR-10 class name
      (`CIFAR10_CLASSES`, which also gives the label);
    - a `.tgz` / `.tar.gz` / `.tar` archive of that tree (an enclosing
      top folder is fine). It is read in place without extracting; the
      decoded arrays are cached (see `cache`) since decoding 60000 JPEGs
      takes about half a minute.

    `None` downloads it with `keras.datasets.cifar10.load_data()`, which
    needs internet.

    Samples come in a deterministic order: batch order for the pickles,
    sorted by class then file name for image folders.

    Args:
        data_dir: path as above, or `None`.
        limit: optional int; keep only the first `limit` samples of each
            split after a fixed shuffle (so every class is represented). For
            image folders/archives without a cache, only those samples are
            decoded.
        cache: whether to cache the decoded images of an archive as an .npz
            in `$LUTQ_TF_CACHE_DIR`, else `$XDG_CACHE_HOME/lutq_tf`, else
            `~/.cache/lutq_tf`. The key is the archive's name, size and
            modification time.

    Returns:
        `(x_train, y_train), (x_test, y_test)`; images `(N, 32, 32, 3)`
        float32 in [0, 1], labels `(N,)` int32.
    """
    if limit is not None:
        _check_limit(limit)
    if data_dir is None:
        try:
            import keras

            (x_train, y_train), (x_test, y_test) = (
                keras.datasets.cifar10.load_data()
            )
        except Exception as e:
            raise RuntimeError(
                "Could not download CIFAR-10 with keras.datasets "
                f"({type(e).__name__}: {e}). Pass a local copy instead: "
                "`data_dir=` (or `--data_dir` on the command line) pointing "
                "at `cifar-10-batches-py`, a train/<class>/ + test/<class>/ "
                "image tree, or a .tgz of that tree."
            ) from e
        return (
            _finish(x_train, y_train.reshape(-1), limit),
            _finish(x_test, y_test.reshape(-1), limit),
        )

    path = _existing_path(data_dir, "data_dir")
    if os.path.isdir(path):
        batches = _find_pickle_dir(path)
        if batches is not None:
            return _cifar_from_pickle_dir(batches, limit)
        if all(os.path.isdir(os.path.join(path, s)) for s in ("train", "test")):
            return _cifar_from_image_dir(path, limit)
        raise ValueError(
            f"`data_dir` {path!r} has no CIFAR-10 layout I know. Expected "
            "either `data_batch_1`..`data_batch_5` + `test_batch` (the python "
            "version, possibly inside `cifar-10-batches-py/`), or `train/` and "
            "`test/` folders with one sub-folder per class "
            f"({', '.join(CIFAR10_CLASSES)})."
        )
    if tarfile.is_tarfile(path):
        return _cifar_from_tar(path, limit, cache)
    raise ValueError(
        f"`data_dir` {path!r} is a file but not a tar archive. Pass a "
        ".tgz/.tar.gz of train/<class>/ and test/<class>/ image folders, the "
        "`cifar-10-python.tar.gz` archive, or a directory."
    )


def _find_pickle_dir(path):
    """Returns the directory holding the python batches, or None."""
    for d in (path, os.path.join(path, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(d, "data_batch_1")):
            return d
    return None


def _decode_pickle_batch(fileobj, where):
    try:
        batch = pickle.load(fileobj, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"])
    except Exception as e:
        raise ValueError(
            f"{where} is not a CIFAR-10 python batch (a pickled dict with "
            f"b'data' and b'labels'): {type(e).__name__}: {e}"
        ) from e
    # Rows are 3072 bytes: the 1024 red, then green, then blue values.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _cifar_from_pickle_dir(batch_dir, limit):
    def read(names):
        xs, ys = [], []
        for name in names:
            file = os.path.join(batch_dir, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"`data_dir` {batch_dir!r} looks like the CIFAR-10 python "
                    f"version but lacks {name!r}; it needs data_batch_1.."
                    "data_batch_5 and test_batch."
                )
            with open(file, "rb") as f:
                x, y = _decode_pickle_batch(f, file)
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = read(_TRAIN_BATCHES)
    x_test, y_test = read(("test_batch",))
    return _finish(x_train, y_train, limit), _finish(x_test, y_test, limit)


def _image_key(relpath):
    """Parses `<...>/<split>/<class>/<file>.<img>` into (split, label, file)."""
    parts = relpath.replace("\\", "/").split("/")
    if len(parts) < 3 or not parts[-1].lower().endswith(_IMAGE_EXTENSIONS):
        return None
    split, cls, fname = parts[-3], parts[-2], parts[-1]
    if split not in ("train", "test"):
        return None
    return split, cls, fname


def _index_images(relpaths, where):
    """Groups image paths by split, sorted by (label, file name).

    Returns `{"train": [(label, relpath), ...], "test": [...]}`.
    """
    index = {"train": [], "test": []}
    unknown = set()
    for rel in relpaths:
        key = _image_key(rel)
        if key is None:
            continue
        split, cls, fname = key
        if cls not in CIFAR10_CLASSES:
            unknown.add(cls)
            continue
        index[split].append((CIFAR10_CLASSES.index(cls), fname, rel))
    if unknown:
        raise ValueError(
            f"`data_dir` {where!r} has class folders that are not CIFAR-10 "
            f"classes: {sorted(unknown)}. Folder names must be among "
            f"{list(CIFAR10_CLASSES)} (they give the labels)."
        )
    for split, items in index.items():
        if not items:
            raise ValueError(
                f"`data_dir` {where!r} has no images under `{split}/<class>/` "
                f"(expected {', '.join(_IMAGE_EXTENSIONS)} files in class "
                "folders named after the CIFAR-10 classes)."
            )
        items.sort(key=lambda t: (t[0], t[1], t[2]))
        index[split] = [(label, rel) for label, _, rel in items]
    return index


def _limit_indices(n, limit):
    """Indices kept by `limit`: first `limit` of a fixed permutation."""
    if limit is None:
        return np.arange(n)
    limit = _check_limit(limit)
    perm = np.random.default_rng(_LIMIT_SEED).permutation(n)
    return perm[: min(limit, n)]


def _decode_images(items, open_fn):
    from PIL import Image

    x = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
    y = np.empty((len(items),), dtype=np.int32)
    for i, (label, rel) in enumerate(items):
        with open_fn(rel) as f:
            img = Image.open(f)
            img = img.convert("RGB")
        if img.size != (32, 32):
            raise ValueError(
                f"CIFAR-10 image {rel!r} is {img.size[0]}x{img.size[1]}, "
                "expected 32x32."
            )
        x[i] = np.asarray(img, dtype=np.uint8)
        y[i] = label
    return x, y


def _require_pillow():
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "Reading CIFAR-10 image folders/archives needs Pillow: "
            "`pip install pillow` (or install the project with the "
            "`examples` extra)."
        ) from e


def _load_indexed(index, open_fn, limit):
    """Decodes the (limited) images of each split; returns uint8 arrays."""
    out = []
    for split in ("train", "test"):
        items = index[split]
        keep = _limit_indices(len(items), limit)
        out.append(_decode_images([items[i] for i in keep], open_fn))
    return out


def _cifar_from_image_dir(root, limit):
    _require_pillow()
    relpaths = []
    for split in ("train", "test"):
        for dirpath, _, files in os.walk(os.path.join(root, split)):
            for fname in files:
                relpaths.append(
                    os.path.relpath(os.path.join(dirpath, fname), root)
                )
    index = _index_images(relpaths, root)
    (x_train, y_train), (x_test, y_test) = _load_indexed(
        index, lambda rel: open(os.path.join(root, rel), "rb"), limit
    )
    return _finish(x_train, y_train), _finish(x_test, y_test)


def _cifar_from_tar(path, limit, cache):
    cache_file = _cache_file(path) if cache else None
    if cache_file is not None and os.path.isfile(cache_file):
        try:
            with np.load(cache_file, allow_pickle=False) as f:
                arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
            x_train, y_train, x_test, y_test = arrays
            return (
                _finish(x_train, y_train, limit),
                _finish(x_test, y_test, limit),
            )
        except Exception as e:  # a corrupt cache is rebuilt, not fatal
            warnings.warn(f"Ignoring unreadable CIFAR-10 cache {cache_file}: {e}")

    # One sequential pass over the archive: random access into a gzip stream
    # re-decompresses from the start on every backward seek, which made
    # reading members in class order take minutes.
    batch_names = set(_TRAIN_BATCHES) | {"test_batch"}
    contents = {}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if base in batch_names or _image_key(member.name) is not None:
                contents[member.name] = tar.extractfile(member).read()

    # The original `cifar-10-python.tar.gz` holds pickled batches.
    by_base = {os.path.basename(n): n for n in contents}
    if "data_batch_1" in by_base:
        def read(wanted):
            xs, ys = [], []
            for b in wanted:
                if b not in by_base:
                    raise ValueError(
                        f"`data_dir` archive {path!r} holds CIFAR-10 python "
                        f"batches but lacks {b!r}."
                    )
                x, y = _decode_pickle_batch(
                    io.BytesIO(contents[by_base[b]]), f"{path}:{b}"
                )
                xs.append(x)
                ys.append(y)
            return np.concatenate(xs), np.concatenate(ys)

        x_train, y_train = read(_TRAIN_BATCHES)
        x_test, y_test = read(("test_batch",))
        return _finish(x_train, y_train, limit), _finish(x_test, y_test, limit)

    _require_pillow()
    index = _index_images(list(contents), path)
    # With a cache, decode everything once; without, only what `limit` keeps.
    (x_train, y_train), (x_test, y_test) = _load_indexed(
        index,
        lambda name: io.BytesIO(contents[name]),
        None if cache_file else limit,
    )
    contents = None  # the archive's bytes are no longer needed

    if cache_file is not None:
        _write_cache(
            cache_file,
            x_train=x_train,
            y_train=y_train,
            x_test=x_test,
            y_test=y_test,
        )
        return _finish(x_train, y_train, limit), _finish(x_test, y_test, limit)
    # Without a cache, `limit` was already applied while decoding.
    return _finish(x_train, y_train), _finish(x_test, y_test)


def cache_dir():
    """Directory of the decoded-dataset cache (may not exist yet)."""
    d = os.environ.get("LUTQ_TF_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "lutq_tf")


def _cache_file(path):
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(path))
    return os.path.join(cache_dir(), f"cifar10-{stem}-{digest}.npz")


def _write_cache(cache_file, **arrays):
    # Write to a temporary name then rename, so a concurrent or interrupted
    # run never sees a half-written cache.
    tmp = f"{cache_file}.{os.getpid()}.tmp.npz"
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, cache_file)
    except OSError as e:
        warnings.warn(
            f"Could not write the CIFAR-10 cache {cache_file} ({e}); "
            "the archive will be decoded again next time. Set "
            "LUTQ_TF_CACHE_DIR to a writable directory to cache it."
        )
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------


def validation_split(x, y, fraction=0.1):
    """`(train, validation)`: the last `fraction` of a fixed shuffle of `(x, y)`
    held out.

    The same split for every benchmark that searches on it, in both of
    their processes (Keras 3 and the tfmot baseline's tf_keras): the
    shuffle is `np.random.default_rng(0).permutation(len(x))`.

    Args:
        x, y: training images and labels (numpy arrays, same length).
        fraction: the share held out for validation.

    Returns:
        `((x_fit, y_fit), (x_validation, y_validation))`.
    """
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(len(x) * (1 - fraction))
    fit, held = order[:cut], order[cut:]
    return (x[fit], y[fit]), (x[held], y[held])


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _existing_path(path, arg_name):
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"`{arg_name}` does not exist: {path!r}.")
    return path


def _check_limit(limit):
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)):
        raise TypeError(f"`limit` must be a positive int or None, got {limit!r}.")
    if limit <= 0:
        raise ValueError(f"`limit` must be a positive int or None, got {limit}.")
    return int(limit)


def _finish(x, y, limit=None):
    """Applies `limit`, scales uint8 images to float32 [0, 1], labels int32."""
    y = np.asarray(y).reshape(-1)
    if limit is not None:
        keep = _limit_indices(len(x), limit)
        x, y = x[keep], y[keep]
    x = np.asarray(x)
    # Integer pixels are 0..255; float images already in [0, 1] stay as is.
    scale = np.issubdtype(x.dtype, np.integer) or (x.size and x.max() > 1.0)
    x = x.astype(np.float32)  # always a copy: never scale the caller's array
    if scale:
        x /= 255.0
    return x, y.astype(np.int32)
