"""Datasets: MNIST (IDX files, offline-first), image folders, prompt CSVs, and cached latents."""

from __future__ import annotations

import gzip
import logging
import os
import urllib.request
from typing import Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)

MNIST_FILES = {
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
}
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"


def default_data_dir() -> Optional[str]:
    """``$SALUN_DATA_DIR``, else ``../shared/data`` beside the checkout (the project's test/benchmark data)."""
    env = os.environ.get("SALUN_DATA_DIR")
    if env:
        return env
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (os.path.join(here, "..", "shared", "data"), os.path.join(os.getcwd(), "..", "shared", "data")):
        if os.path.isdir(cand):
            return os.path.normpath(cand)
    return None


def data_file(*parts: str) -> Optional[str]:
    """A file of the project's data folder (:func:`default_data_dir`), or None where it is absent."""
    base = default_data_dir()
    path = os.path.join(base, *parts) if base else None
    return path if path and os.path.exists(path) else None


def _find_mnist_dir(path: Optional[str]) -> Optional[str]:
    if path:
        return path
    env = os.environ.get("SALUN_MNIST_DIR")
    if env:
        return env
    base = default_data_dir()
    return os.path.join(base, "mnist") if base else None


def _read_idx(path: str, offset: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_mnist(path: Optional[str] = None, split: str = "test", download: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Load MNIST as ``(images uint8 [N, 28, 28], labels int64 [N])``.

    Looks in ``path``, else ``$SALUN_MNIST_DIR``, else ``../shared/data/mnist``. Accepts gzipped or plain IDX files.
    Where the files are missing and a network exists, downloads them into ``path`` (``download=True``).
    """
    if split not in MNIST_FILES:
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    directory = _find_mnist_dir(path)
    img_name, lbl_name = MNIST_FILES[split]

    def locate(name):
        for cand in (name, name[:-3]):
            full = os.path.join(directory, cand) if directory else None
            if full and os.path.isfile(full):
                return full
        return None

    img_path, lbl_path = locate(img_name), locate(lbl_name)
    if (img_path is None or lbl_path is None) and download and directory:
        os.makedirs(directory, exist_ok=True)
        try:
            for name in (img_name, lbl_name):
                target = os.path.join(directory, name)
                if not os.path.isfile(target):
                    logger.info("downloading %s", name)
                    urllib.request.urlretrieve(MNIST_MIRROR + name, target + ".part")
                    os.replace(target + ".part", target)
        except OSError as exc:
            logger.warning("MNIST download failed: %s", exc)
        img_path, lbl_path = locate(img_name), locate(lbl_name)
    if img_path is None or lbl_path is None:
        raise FileNotFoundError(
            f"MNIST {split} files ({img_name}, {lbl_name}) not found in {directory!r}; pass the folder holding them "
            "(e.g. --mnist_dir ../shared/data/mnist) or set SALUN_MNIST_DIR")
    images = _read_idx(img_path, 16).reshape(-1, 28, 28)
    labels = _read_idx(lbl_path, 8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"MNIST files disagree: {len(images)} images but {len(labels)} labels")
    return images, labels
