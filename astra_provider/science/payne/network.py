"""The Payne's emulator network: a small fully connected network from scaled labels to normalised flux.

For scaled labels ``x`` (N, K) and hidden layers ``l = 1..L`` (widths ``H_1..H_L``)::

    h_0 = x,    h_l = tanh(h_{l-1} W_l^T + b_l),    flux = a theta^T,    a = [1, h_L]   (N, D = H_L + 1)

The output layer ``theta`` (P, D) is linear in the *features* ``a``: each pixel is a weighted sum of the
last hidden layer (column 0 is the pixel's bias). That linearity is what makes both training (the output
layer is solved exactly by least squares, see :mod:`.train`) and the test step (chi-squared through
precomputed ``theta^T W theta``, see :mod:`.fit`) fast. ``tanh`` is used because the test step needs a
smooth model with a continuous Jacobian (a leaky ReLU network is piecewise linear in the labels); it is the
logistic sigmoid of The Payne up to a rescaling of the weights.

Everything is batch-first numpy in float64. Gradients are analytic: :meth:`Network.features_and_jacobian`
(d features / d labels, for the test step) and :meth:`Network.backward` (d loss / d weights, for training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Network", "ACTIVATION"]

#: The hidden-layer activation (stored with every model).
ACTIVATION = "tanh"


@dataclass(eq=False)
class Network:
    """Hidden layers of the emulator: ``weights[l]`` (H_l, H_{l-1}) and ``biases[l]`` (H_l,), H_0 = K."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]

    def __post_init__(self) -> None:
        self.weights = [np.asarray(w, dtype=np.float64) for w in self.weights]
        self.biases = [np.asarray(b, dtype=np.float64).reshape(-1) for b in self.biases]
        if not self.weights or len(self.weights) != len(self.biases):
            raise ValueError("a network needs one (weights, biases) pair per hidden layer, at least one")
        for index, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise ValueError(f"hidden layer {index}: weights {w.shape} and biases {b.shape} do not match")
            if index and w.shape[1] != self.weights[index - 1].shape[0]:
                raise ValueError(
                    f"hidden layer {index} takes {w.shape[1]} inputs but layer {index - 1} has "
                    f"{self.weights[index - 1].shape[0]} units"
                )

    @classmethod
    def initialise(cls, n_labels: int, hidden_sizes: Sequence[int], rng: np.random.Generator) -> Network:
        """Random weights with variance 1/fan-in (LeCun), zero biases."""
        sizes = [int(n_labels), *(int(h) for h in hidden_sizes)]
        if any(size < 1 for size in sizes):
            raise ValueError(f"layer sizes must be positive, got {sizes}")
        weights = [
            rng.normal(0.0, 1.0 / np.sqrt(sizes[i]), (sizes[i + 1], sizes[i])) for i in range(len(sizes) - 1)
        ]
        return cls(weights, [np.zeros(size) for size in sizes[1:]])

    # -- shapes and parameter vectors ------------------------------------------------------------------------
    @property
    def n_labels(self) -> int:
        return self.weights[0].shape[1]

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(w.shape[0] for w in self.weights)

    @property
    def n_features(self) -> int:
        """D = H_L + 1: the number of output-layer coefficients per pixel."""
        return self.weights[-1].shape[0] + 1

    @property
    def n_parameters(self) -> int:
        """Number of hidden-layer parameters (weights and biases)."""
        return sum(w.size + b.size for w, b in zip(self.weights, self.biases, strict=True))

    def parameter_vector(self) -> np.ndarray:
        """All hidden-layer parameters as one vector (layer by layer: weights, then biases)."""
        return np.concatenate(
            [part.ravel() for w, b in zip(self.weights, self.biases, strict=True) for part in (w, b)]
        )

    def with_parameters(self, vector: np.ndarray) -> Network:
        """A network of the same shape with the parameters of ``vector`` (see :meth:`parameter_vector`)."""
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (self.n_parameters,):
            raise ValueError(f"expected {self.n_parameters} parameters, got {vector.shape}")
        weights, biases, start = [], [], 0
        for w, b in zip(self.weights, self.biases, strict=True):
            weights.append(vector[start : start + w.size].reshape(w.shape))
            start += w.size
            biases.append(vector[start : start + b.size])
            start += b.size
        return Network(weights, biases)

    # -- forward passes --------------------------------------------------------------------------------------
    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_labels:
            raise ValueError(f"expected scaled labels of shape (N, {self.n_labels}), got {x.shape}")
        return x

    def hidden(self, x: np.ndarray) -> list[np.ndarray]:
        """Activations of every hidden layer for scaled labels ``x`` (N, K): a list of (N, H_l)."""
        h = self._check(x)
        out = []
        for w, b in zip(self.weights, self.biases, strict=True):
            h = np.tanh(h @ w.T + b)
            out.append(h)
        return out

    def features(self, x: np.ndarray) -> np.ndarray:
        """Features ``a = [1, h_L]`` (N, D) of scaled labels ``x`` (N, K)."""
        last = self.hidden(x)[-1]
        return np.concatenate([np.ones((last.shape[0], 1)), last], axis=1)

    def features_and_jacobian(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features (N, D) and their derivative with respect to the scaled labels (N, D, K)."""
        h = self._check(x)
        n = h.shape[0]
        jacobian = np.broadcast_to(np.eye(self.n_labels), (n, self.n_labels, self.n_labels))
        for w, b in zip(self.weights, self.biases, strict=True):
            h = np.tanh(h @ w.T + b)
            # d tanh(z)/dz = 1 - tanh^2; dz/dx = W @ (dh_prev/dx)
            jacobian = (1.0 - h * h)[:, :, None] * np.matmul(w, jacobian)
        features = np.concatenate([np.ones((n, 1)), h], axis=1)
        return features, np.concatenate([np.zeros((n, 1, self.n_labels)), jacobian], axis=1)

    # -- training gradient -----------------------------------------------------------------------------------
    def backward(self, x: np.ndarray, hidden: list[np.ndarray], d_last: np.ndarray) -> np.ndarray:
        """Gradient of a loss with respect to :meth:`parameter_vector`, given d loss / d h_L (N, H_L).

        ``hidden`` is the output of :meth:`hidden` for the same ``x``.
        """
        inputs = [self._check(x), *hidden[:-1]]
        grads: list[np.ndarray] = []
        d_h = np.asarray(d_last, dtype=np.float64)
        for layer in range(len(self.weights) - 1, -1, -1):
            d_z = d_h * (1.0 - hidden[layer] * hidden[layer])
            grads.append(d_z.sum(axis=0))  # biases (appended before weights: the list is reversed below)
            grads.append(d_z.T @ inputs[layer])
            if layer:
                d_h = d_z @ self.weights[layer]
        return np.concatenate([g.ravel() for g in reversed(grads)])
