"""Datasets that need no download: scikit-learn's handwritten digits (1797 8x8 images)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

DIGITS_MEAN, DIGITS_STD = 4.88, 6.02  # of the 0..16 pixel values, over the whole set


def digits(split: str, seed: int = 0) -> TensorDataset:
    """``split`` "train" (80 %) or "test" (20 %): images 1x8x8 normalised, labels 0..9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) - DIGITS_MEAN) / DIGITS_STD
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    idx = order[:cut] if split == "train" else order[cut:]
    return TensorDataset(torch.from_numpy(x[idx, None]), torch.from_numpy(data.target[idx]))


def loader(split: str, batch_size: int = 64, shuffle: bool | None = None) -> DataLoader:
    shuffle = split == "train" if shuffle is None else shuffle
    gen = torch.Generator().manual_seed(0)
    return DataLoader(digits(split), batch_size=batch_size, shuffle=shuffle, generator=gen)


@torch.no_grad()
def accuracy(model, data: DataLoader) -> float:
    """Top-1 accuracy in percent."""
    correct = total = 0
    for x, y in data:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


# ----------------------------------------------------------------------------- local datasets
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm"}


class DatasetError(ValueError):
    """A dataset folder that is missing or not in the expected format."""


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def cifar10(root: str, split: str = "test") -> TensorDataset:
    """CIFAR-10 from its python-pickle batches in ``root`` (``data_batch_1..5``,
    ``test_batch``, as the official archive unpacks): images 3x32x32 normalised, labels."""
    import pickle
    from pathlib import Path

    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    files = [Path(root) / n for n in names if (Path(root) / n).is_file()]
    if not files:
        raise DatasetError(f"{root!r}: no CIFAR-10 batch files ({', '.join(names)}) found")
    xs, ys = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], np.int64))
        except Exception as err:  # truncated pickle, wrong keys, wrong sizes
            raise DatasetError(f"{str(f)!r} is not a CIFAR-10 batch: {type(err).__name__}: {err}") from None
    x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
    return TensorDataset(_normalize(x, CIFAR_MEAN, CIFAR_STD), torch.from_numpy(np.concatenate(ys)))


def image_folder(root: str, size: int = 224) -> TensorDataset:
    """ImageNet-style folder: one sub-folder per class (sorted names -> labels 0..), images
    resized (shorter side ``size * 8 / 7``), centre-cropped to ``size``, normalised."""
    from pathlib import Path

    from PIL import Image

    root_path = Path(root)
    classes = sorted(p for p in root_path.iterdir() if p.is_dir()) if root_path.is_dir() else []
    files = [(f, label) for label, c in enumerate(classes) for f in sorted(c.iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"{root!r}: expected class sub-folders with images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    resize = round(size * 8 / 7)
    xs = []
    for f, _ in files:
        try:
            img = Image.open(f).convert("RGB")
        except Exception as err:
            raise DatasetError(f"{str(f)!r} is not a readable image: {err}") from None
        w, h = img.size
        scale = resize / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
        xs.append(torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1))
    x = _normalize(torch.stack(xs), IMAGENET_MEAN, IMAGENET_STD)
    return TensorDataset(x, torch.tensor([label for _, label in files]))
