"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (IDX files, read offline)."""

import gzip
import os

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
          "Bag", "Ankle boot"]


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(directory=None):
    """Return ``(x_train, y_train), (x_test, y_test)``: images as float32 in [0, 1] with shape
    (n, 28, 28, 1), labels as int32 (they convert to R integers).

    Reads the IDX files of Debian's ``dataset-fashion-mnist`` (``apt-get install
    dataset-fashion-mnist``) or ``$PRIVATEKERAS_FASHION_MNIST``; nothing is downloaded.
    """
    directory = directory or os.environ.get("PRIVATEKERAS_FASHION_MNIST", FASHION_MNIST_DIR)
    files = {
        "x_train": "train-images-idx3-ubyte.gz", "y_train": "train-labels-idx1-ubyte.gz",
        "x_test": "t10k-images-idx3-ubyte.gz", "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [f for f in files.values() if not os.path.exists(os.path.join(directory, f))]
    if missing:
        raise FileNotFoundError(
            "Fashion-MNIST not found in {} (missing {}): install Debian's dataset-fashion-mnist "
            "package".format(directory, ", ".join(missing)))
    arrays = {k: _read_idx(os.path.join(directory, f)) for k, f in files.items()}

    def images(a):
        return (a.astype(np.float32) / 255.0)[..., None]

    return ((images(arrays["x_train"]), arrays["y_train"].astype(np.int32)),
            (images(arrays["x_test"]), arrays["y_test"].astype(np.int32)))
