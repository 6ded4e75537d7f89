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
