"""MNIST, Fashion-MNIST and KMNIST through tensorflow-datasets, and CIFAR-10
through `keras.datasets`, online or offline.

Online, TFDS downloads and prepares the data as usual. Offline, pass a
directory laid out like `shared/datasets` (`<dir>/<name>/<the files TFDS
downloads>`) with `data_dir=` or the environment variable
`TF_LAYERSPARSE_DATA_DIR`; it becomes TFDS's manual directory, and TFDS
still checks every file's checksum.

CIFAR-10 online comes from `keras.datasets.cifar10`; offline from one
`.npz` file with `x_train`, `y_train`, `x_test`, `y_test` (uint8 images
(n, 32, 32, 3), labels (n,)): `data_dir` is that file, or a directory
holding `cifar10/cifar10.npz` (as `shared/datasets` does).

KMNIST's offline copy may lack its training images. Then, and only when
`allow_substitute=True`, the study uses a substitute that says so in its
`source`: the 10,000 test images, shuffled and split into disjoint parts
for training, validation and test. It is never used silently.
"""

import dataclasses
import gzip
import os

import numpy as np

__all__ = ["Images", "DATASETS", "load_images", "load_cifar10", "data_dir_from_env"]

DATASETS = ("mnist", "fashion_mnist", "kmnist", "cifar10")
ENV_DATA_DIR = "TF_LAYERSPARSE_DATA_DIR"
_TRAIN_IMAGES = "train-images-idx3-ubyte.gz"


@dataclasses.dataclass
class Images:
    """Flattened images scaled to [0, 1] (float32) and integer labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # where the data came from, shown in every table
    shape: tuple = (28, 28, 1)  # of one image; rows of x_* are flattened images

    @property
    def substitute(self):
        return "substitute" in self.source


def data_dir_from_env(data_dir=None):
    return data_dir or os.environ.get(ENV_DATA_DIR) or None


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _flatten(images):
    images = np.asarray(images)
    return (images.reshape(len(images), -1) / 255.0).astype("float32")


def _kmnist_substitute(manual_dir):
    x = _read_idx(os.path.join(manual_dir, "t10k-images-idx3-ubyte.gz"))
    y = _read_idx(os.path.join(manual_dir, "t10k-labels-idx1-ubyte.gz"))
    # training and test parts are cut from this one split by the study
    return Images("kmnist", _flatten(x), y.astype("int32"), None, None,
                  source="offline substitute: KMNIST test split only (no training "
                         "images offline), split into disjoint train/validation/test parts")


def load_images(name, data_dir=None, *, tfds_dir=None, allow_substitute=False):
    """Load one of `DATASETS` with TFDS; see the module docstring.

    `tfds_dir` is where TFDS keeps the prepared data (its `data_dir`;
    default `~/tensorflow_datasets`).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name == "cifar10":
        return load_cifar10(data_dir_from_env(data_dir))
    import tensorflow_datasets as tfds

    manual = data_dir_from_env(data_dir)
    builder = tfds.builder(name, data_dir=tfds_dir)
    if manual is not None:
        manual = os.path.join(manual, name)
        if not os.path.isdir(manual):
            raise FileNotFoundError(f"offline data directory {manual!r} does not exist")
        missing = not os.path.exists(os.path.join(manual, _TRAIN_IMAGES))
        if missing and not _prepared(builder):
            if name == "kmnist" and allow_substitute:
                return _kmnist_substitute(manual)
            raise FileNotFoundError(
                f"{os.path.join(manual, _TRAIN_IMAGES)} is missing, so TFDS cannot "
                f"prepare '{name}' offline"
                + (" (pass allow_substitute=True for the labelled test-split "
                   "substitute)" if name == "kmnist" else "")
            )
        config = tfds.download.DownloadConfig(manual_dir=manual)
        # TFDS extracts manual files to <downloads>/extracted/GZIP.<file name>;
        # MNIST and Fashion-MNIST share file names, so a shared downloads
        # folder would hand one dataset the other's pixels. One per dataset.
        downloads = os.path.join(os.path.dirname(os.path.dirname(str(builder.data_dir))),
                                 "downloads", f"manual_{name}")
        builder.download_and_prepare(download_dir=downloads, download_config=config)
        source = f"TFDS '{name}' prepared offline from {manual}"
    else:
        builder.download_and_prepare()
        source = f"TFDS '{name}'"
    train = tfds.as_numpy(builder.as_dataset(split="train", batch_size=-1))
    test = tfds.as_numpy(builder.as_dataset(split="test", batch_size=-1))
    return Images(name, _flatten(train["image"]), train["label"].astype("int32"),
                  _flatten(test["image"]), test["label"].astype("int32"), source)


def load_cifar10(path=None):
    """CIFAR-10 as `Images` (shape (32, 32, 3)); see the module docstring for `path`.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> x = np.full((4, 32, 32, 3), 255, np.uint8); y = np.arange(4, dtype=np.uint8)
    >>> np.savez(os.path.join(folder, "c.npz"), x_train=x, y_train=y, x_test=x, y_test=y)
    >>> images = load_cifar10(os.path.join(folder, "c.npz"))
    >>> images.x_train.shape, float(images.x_train.max()), images.shape
    ((4, 3072), 1.0, (32, 32, 3))
    """
    if path is None:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        source = "keras.datasets.cifar10"
    else:
        if os.path.isdir(path):
            path = os.path.join(path, "cifar10", "cifar10.npz")
        if not os.path.exists(path):
            raise FileNotFoundError(f"CIFAR-10 file {path!r} does not exist")
        with np.load(path) as data:
            x_train, y_train, x_test, y_test = (data[k] for k in (
                "x_train", "y_train", "x_test", "y_test"))
        source = f"CIFAR-10 from {path}"
    return Images("cifar10", _flatten(x_train), np.ravel(y_train).astype("int32"),
                  _flatten(x_test), np.ravel(y_test).astype("int32"), source,
                  shape=(32, 32, 3))


def _prepared(builder):
    try:
        return bool(builder.info.splits) and builder.data_path.exists()
    except Exception:  # noqa: BLE001 - an unprepared builder raises various errors
        return False
