"""In-memory image classification data (MNIST, CIFAR-10) and the forgetting scenarios.

Everything is held as normalised float tensors: MNIST and CIFAR-10 fit in memory, and batching by index is much
faster than a ``DataLoader`` on a small CPU.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from ..data import default_data_dir, load_mnist

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "cifar10")
SCENARIOS = ("random", "class")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class ImageData:
    """A train/test split of normalised images ``[N, C, H, W]`` (float32) with int64 labels."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    source: str = ""

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])


@dataclass
class ForgetSplit:
    """Indices into the training set: the forget set and the retain set (disjoint, covering it)."""

    forget_idx: torch.Tensor
    retain_idx: torch.Tensor
    scenario: str
    forget_class: Optional[int] = None


def _normalise(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


def load_mnist_data(path: Optional[str] = None, source: str = "test_split", train_size: int = 8000,
                    split_seed: int = 0) -> ImageData:
    """MNIST as :class:`ImageData`.

    ``source="test_split"`` (default) splits the official 10k *test* file into ``train_size`` training and the rest
    test images with a seeded permutation (the project's offline data holds only that file). ``source="official"``
    uses the official 60k/10k split and needs the training files in ``path`` as well.
    """
    if source == "official":
        tx, ty = load_mnist(path, split="train", download=False)
        vx, vy = load_mnist(path, split="test", download=False)
    elif source == "test_split":
        images, labels = load_mnist(path, split="test", download=False)
        if not 0 < train_size < len(images):
            raise ValueError(f"train_size must be in (0, {len(images)}) to leave a test set, got {train_size}")
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed)).numpy()
        tx, ty = images[perm[:train_size]], labels[perm[:train_size]]
        vx, vy = images[perm[train_size:]], labels[perm[train_size:]]
    else:
        raise ValueError(f"MNIST source must be 'test_split' or 'official', got {source!r}")
    return ImageData("mnist", _normalise(tx, (MNIST_MEAN,), (MNIST_STD,)), torch.from_numpy(np.asarray(ty, np.int64)),
                     _normalise(vx, (MNIST_MEAN,), (MNIST_STD,)), torch.from_numpy(np.asarray(vy, np.int64)), 10,
                     source=f"mnist:{source}")


def _cifar_folder(path: Optional[str]) -> Optional[str]:
    roots = [path] if path else [os.environ.get("SALUN_CIFAR10_DIR"), default_data_dir()]
    for root in filter(None, roots):
        for cand in (root, os.path.join(root, "cifar-10-batches-py")):
            if os.path.isfile(os.path.join(cand, "test_batch")):
                return cand
    return None


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 python batch holds: dicts, lists, str, bytes, numbers and numpy arrays.

    ``pickle.load`` would run whatever callable a crafted file names; here any other global is refused before it is
    looked up, so no code from the file runs."""

    _ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    _ALLOWED |= {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"),
                 ("numpy", "dtype"), ("_codecs", "encode")}  # _codecs.encode: bytes pickled by Python 3, protocol 2

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def read_cifar_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """One ``cifar-10-batches-py`` batch file as ``(images [N, 32, 32, 3] uint8, labels [N])``, read with a restricted
    unpickler (no code runs from the file) and checked to be a CIFAR-10 batch."""
    problem = None
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        problem = f"refused to unpickle it: {exc}"
    else:
        data = batch.get("data") if isinstance(batch, dict) else None
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
            problem = "it holds no 'data' array of uint8 rows of 3072 pixels"
        elif not (isinstance(labels, list) and len(labels) == len(data)
                  and all(isinstance(v, (int, np.integer)) and 0 <= v < 10 for v in labels)):
            problem = "its 'labels' are not one class index in 0..9 per image"
    if problem:
        raise ValueError(f"{path} is not a CIFAR-10 python batch ({problem}); re-extract cifar-10-python.tar.gz from "
                         "https://www.cs.toronto.edu/~kriz/cifar.html")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels)


def load_cifar10_data(path: Optional[str] = None) -> ImageData:
    """CIFAR-10 (50k/10k) from the standard ``cifar-10-batches-py`` pickle folder (``path`` may be it or its parent).

    Falls back to ``torchvision.datasets.CIFAR10(path, download=False)`` when torchvision is installed and the folder
    is not found directly; nothing is downloaded.
    """
    folder = _cifar_folder(path)
    if folder is None:
        try:
            import torchvision  # optional

            train = torchvision.datasets.CIFAR10(path or ".", train=True, download=False)
            test = torchvision.datasets.CIFAR10(path or ".", train=False, download=False)
            arrays = (train.data, np.asarray(train.targets), test.data, np.asarray(test.targets))
        except Exception as exc:  # torchvision missing, or its files missing
            detail = "" if isinstance(exc, ImportError) else f" ({exc.__class__.__name__}: {exc})"
            raise FileNotFoundError(
                f"CIFAR-10 not found at {path!r}: download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, "
                "extract it and pass the folder holding 'cifar-10-batches-py' (e.g. --data_dir /data/cifar) "
                f"or set SALUN_CIFAR10_DIR{detail}") from None
    else:
        parts = [read_cifar_batch(os.path.join(folder, f"data_batch_{i}")) for i in range(1, 6)]
        tx, ty = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        vx, vy = read_cifar_batch(os.path.join(folder, "test_batch"))
        arrays = (tx, ty, vx, vy)
    tx, ty, vx, vy = arrays
    to_x = lambda a: _normalise(np.asarray(a).transpose(0, 3, 1, 2), CIFAR_MEAN, CIFAR_STD)  # noqa: E731
    return ImageData("cifar10", to_x(tx), torch.from_numpy(ty.astype(np.int64)), to_x(vx),
                     torch.from_numpy(vy.astype(np.int64)), 10, source="cifar10")


def load_dataset(name: str, path: Optional[str] = None, *, mnist_source: str = "test_split", train_size: int = 8000,
                 split_seed: int = 0) -> ImageData:
    if name == "mnist":
        return load_mnist_data(path, source=mnist_source, train_size=train_size, split_seed=split_seed)
    if name == "cifar10":
        return load_cifar10_data(path)
    raise ValueError(f"unknown dataset {name!r}; use one of {DATASETS}")


def make_forget_split(labels: torch.Tensor, scenario: str, *, forget_ratio: float = 0.1, forget_class: int = 0,
                      seed: int = 0) -> ForgetSplit:
    """Choose the forget set: ``"random"`` takes ``round(forget_ratio * N)`` training samples at random (seeded);
    ``"class"`` takes every training sample of ``forget_class``."""
    n = len(labels)
    if scenario == "random":
        if not 0.0 < forget_ratio < 1.0:
            raise ValueError(f"forget_ratio must be in (0, 1), got {forget_ratio}; e.g. --forget_ratio 0.1")
        k = int(round(forget_ratio * n))
        if not 0 < k < n:
            raise ValueError(f"forget_ratio {forget_ratio} selects {k} of {n} samples; the forget and retain sets "
                             "must both be non-empty")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        forget = torch.zeros(n, dtype=torch.bool)
        forget[perm[:k]] = True
        cls = None
    elif scenario == "class":
        present = sorted(int(c) for c in torch.unique(labels))
        if forget_class not in present:
            raise ValueError(f"forget_class {forget_class} is not among the training labels {present}")
        forget = labels == forget_class
        if bool(forget.all()):
            raise ValueError("the forget class covers the whole training set; nothing would be retained")
        cls = int(forget_class)
    else:
        raise ValueError(f"unknown scenario {scenario!r}; use one of {SCENARIOS}")
    return ForgetSplit(torch.nonzero(forget).flatten(), torch.nonzero(~forget).flatten(), scenario, cls)


def iterate_batches(n: int, batch_size: int, generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``: shuffled with ``generator``, in order without it."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def subset(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return x[idx], y[idx]
