"""The MLP of Dive into Deep Learning's dropout chapter (two hidden layers of 256 units, dropout
0.2 after the first and 0.5 after the second), trained on scikit-learn's bundled 8x8 digits
(nothing is downloaded), once with torch.nn.Dropout and once with fastdrop.nn.Dropout.

    python examples/train_d2l_mlp.py [--epochs 40] [--seeds 5]

Prints test accuracy and time per epoch for both; the accuracies agree within seed noise.
"""

from __future__ import annotations

import argparse
import statistics
import time

import fastdrop.nn as fnn
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


def load():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return xtr, xte, ytr, yte


def mlp(dropout: type[nn.Module]) -> nn.Sequential:
    """d2l's `Net`: 64 inputs here (8x8 digits) instead of Fashion-MNIST's 784."""
    return nn.Sequential(
        nn.Linear(64, 256),
        nn.ReLU(),
        dropout(0.2),
        nn.Linear(256, 256),
        nn.ReLU(),
        dropout(0.5),
        nn.Linear(256, 10),
    )


def train(dropout: type[nn.Module], seed: int, epochs: int, data) -> tuple[float, float]:
    """Returns (test accuracy, seconds per epoch)."""
    xtr, xte, ytr, yte = data
    torch.manual_seed(seed)  # same weights and batch order for both dropout kinds
    model = mlp(dropout)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr)).split(32):
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    per_epoch = (time.perf_counter() - start) / epochs
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return acc, per_epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    data = load()
    for name, cls in (("torch.nn.Dropout", nn.Dropout), ("fastdrop.nn.Dropout", fnn.Dropout)):
        runs = [train(cls, seed, args.epochs, data) for seed in range(args.seeds)]
        accs = [a for a, _ in runs]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(
            f"{name:20s} test accuracy {statistics.mean(accs):.4f} +- {spread:.4f}   "
            f"{1e3 * statistics.median(t for _, t in runs):7.1f} ms/epoch"
        )


if __name__ == "__main__":
    main()
