"""Where it all starts: Michael Nielsen's `network.py`, trained with llamaforge's `sgd` optimizer.

The network of chapter 1 of "Neural Networks and Deep Learning": a 64-30-10 multilayer perceptron with
sigmoid units, weights and biases drawn from N(0, 1), quadratic cost C = 1/2 ||a - y||^2, trained by
mini-batch stochastic gradient descent with mini-batches of 10 and learning rate eta = 3.0:

    w <- w - (eta / len(mini_batch)) * sum_x nabla_w C_x

Nielsen uses MNIST (28x28 = 784 inputs); here it is scikit-learn's bundled 8x8 digits (1,797 images,
shipped inside scikit-learn, no download), pixels scaled to [0, 1], 1,500 for training and 297 held out.
llamaforge's `SGD` applies `w - lr * grad` to the gradient of the *mean* cost over the mini-batch,
which is exactly the formula above. It reaches about 95% on the held-out digits, as Nielsen's network
does on MNIST.

    python examples/nielsen_digits.py            # 30 epochs, a few seconds
    python examples/nielsen_digits.py --epochs 5 --eta 1.0

Needs scikit-learn (`pip install scikit-learn`).
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import numpy as np
import torch
from torch import nn

from llamaforge.training.optim import SGD


def load_digits_data(n_train: int = 1500, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(x_train, y_train, x_test, y_test): inputs (N, 64) in [0, 1], one-hot targets (N, 10), test labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    x = torch.tensor(digits.data[order] / 16.0, dtype=dtype)  # (1797, 64)
    labels = torch.tensor(digits.target[order], dtype=torch.long)  # (1797,)
    onehot = torch.nn.functional.one_hot(labels, 10).to(dtype)  # (1797, 10)
    return x[:n_train], onehot[:n_train], x[n_train:], labels[n_train:]


def build_network(sizes: tuple[int, ...] = (64, 30, 10), seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Nielsen's Network(sizes): sigmoid layers, every weight and bias drawn from N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        linear = nn.Linear(n_in, n_out, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=dtype))
            linear.bias.copy_(torch.randn(n_out, generator=gen, dtype=dtype))
        layers += [linear, nn.Sigmoid()]
    return nn.Sequential(*layers)


def quadratic_cost(activations: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the mini-batch of C_x = 1/2 ||a(x) - y(x)||^2."""
    return 0.5 * (activations - targets).pow(2).sum(dim=1).mean()


def update_mini_batch(net: nn.Module, optimizer: SGD, x: torch.Tensor, y: torch.Tensor) -> float:
    """One step of Nielsen's `update_mini_batch`: w <- w - (eta / len(mini_batch)) * sum nabla_w."""
    optimizer.zero_grad(set_to_none=True)
    cost = quadratic_cost(net(x), y)
    cost.backward()  # grad = (1 / len(mini_batch)) * sum_x nabla C_x
    optimizer.step()  # w <- w - eta * grad
    return float(cost.detach())


def accuracy(net: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of inputs whose most active output neuron is the right digit."""
    with torch.no_grad():
        return float((net(x).argmax(dim=1) == labels).float().mean())


def train(epochs: int = 30, mini_batch_size: int = 10, eta: float = 3.0, seed: int = 1, verbose: bool = True,
          net: Optional[nn.Module] = None, threads: Optional[int] = 1) -> list[float]:
    """Nielsen's `SGD(training_data, epochs, mini_batch_size, eta, test_data)`; returns test accuracy per epoch.

    `threads`: torch CPU threads while training (one is fastest for matrices this small; None: unchanged).
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(epochs, mini_batch_size, eta, seed, verbose, net)
    finally:
        torch.set_num_threads(previous)


def _train(epochs: int, mini_batch_size: int, eta: float, seed: int, verbose: bool,
           net: Optional[nn.Module]) -> list[float]:
    x_train, y_train, x_test, labels_test = load_digits_data(seed=seed)
    net = net or build_network(seed=seed)
    optimizer = SGD(net.parameters(), lr=eta)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = torch.from_numpy(rng.permutation(len(x_train)))  # random.shuffle(training_data)
        for start in range(0, len(x_train), mini_batch_size):
            idx = order[start:start + mini_batch_size]
            update_mini_batch(net, optimizer, x_train[idx], y_train[idx])
        acc = accuracy(net, x_test, labels_test)
        history.append(acc)
        if verbose:
            n = len(labels_test)
            print(f"Epoch {epoch}: {round(acc * n)} / {n} ({acc:.1%})  [{time.perf_counter() - t0:.2f}s]")
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--mini-batch-size", type=int, default=10)
    parser.add_argument("--eta", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    a = parser.parse_args()
    history = train(a.epochs, a.mini_batch_size, a.eta, a.seed)
    print(f"final test accuracy {history[-1]:.1%} (best {max(history):.1%})")


if __name__ == "__main__":
    main()
