"""Nielsen's network on the digits: one llamaforge `sgd` step equals `update_mini_batch` by hand.

The reference is network.py's own algorithm, written here in numpy: backprop per example (sigmoid,
quadratic cost, `cost_derivative = a - y`), the gradients summed over the mini-batch, and
`w - (eta / len(mini_batch)) * nabla_w`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nielsen_digits.py"


def _example():
    spec = importlib.util.spec_from_file_location("nielsen_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _backprop(weights, biases, x, y):
    """network.py's backprop(x, y) for one example (column vectors)."""
    activation, activations, zs = x, [x], []
    for w, b in zip(weights, biases):
        z = w @ activation + b
        zs.append(z)
        activation = _sigmoid(z)
        activations.append(activation)
    nabla_b = [np.zeros_like(b) for b in biases]
    nabla_w = [np.zeros_like(w) for w in weights]
    delta = (activations[-1] - y) * _sigmoid(zs[-1]) * (1 - _sigmoid(zs[-1]))
    nabla_b[-1], nabla_w[-1] = delta, delta @ activations[-2].T
    for layer in range(2, len(weights) + 1):
        sp = _sigmoid(zs[-layer]) * (1 - _sigmoid(zs[-layer]))
        delta = (weights[-layer + 1].T @ delta) * sp
        nabla_b[-layer], nabla_w[-layer] = delta, delta @ activations[-layer - 1].T
    return nabla_b, nabla_w


def test_one_sgd_step_equals_nielsens_update_mini_batch():
    nd = _example()
    x_train, y_train, _, _ = nd.load_digits_data(dtype=torch.float64)
    net = nd.build_network(seed=3, dtype=torch.float64)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    weights = [m.weight.detach().numpy().copy() for m in linears]
    biases = [m.bias.detach().numpy().copy()[:, None] for m in linears]
    xb, yb = x_train[:10], y_train[:10]
    eta = 3.0

    nabla_b = [np.zeros_like(b) for b in biases]
    nabla_w = [np.zeros_like(w) for w in weights]
    for x, y in zip(xb.numpy(), yb.numpy()):
        db, dw = _backprop(weights, biases, x[:, None], y[:, None])
        nabla_b = [nb + d for nb, d in zip(nabla_b, db)]
        nabla_w = [nw + d for nw, d in zip(nabla_w, dw)]
    expected_w = [w - (eta / len(xb)) * nw for w, nw in zip(weights, nabla_w)]
    expected_b = [b - (eta / len(xb)) * nb for b, nb in zip(biases, nabla_b)]

    from llamaforge.training.optim import SGD

    nd.update_mini_batch(net, SGD(net.parameters(), lr=eta), xb, yb)
    assert any(np.abs(e - w).max() > 1e-3 for e, w in zip(expected_w, weights))  # the step moved the weights
    for m, w, b in zip(linears, expected_w, expected_b):
        np.testing.assert_allclose(m.weight.detach().numpy(), w, rtol=0, atol=1e-12)
        np.testing.assert_allclose(m.bias.detach().numpy(), b[:, 0], rtol=0, atol=1e-12)


def test_the_network_learns_the_digits():
    nd = _example()
    history = nd.train(epochs=8, seed=1, verbose=False)
    # 8 of Nielsen's 30 epochs: already far above chance (10%); the full run reaches ~96% with this seed
    assert history[-1] > 0.85
    assert len(history) == 8
