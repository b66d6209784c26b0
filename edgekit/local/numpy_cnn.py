"""A small convolutional network trainer in numpy, enough to make the tensor fixtures without a framework.

Layers cache in ``forward(x, train=True)`` what ``backward`` needs and keep their gradients in
``grads``: ``Conv2d`` (im2col, stride 1, zero padding), ``Conv1d`` (a ``Conv2d`` of height 1 on
``[N, C, W]``), ``ReLU``, ``MaxPool2`` (2x2, stride 2, odd edges dropped as ONNX's floor mode does),
``GlobalAvgPool``, ``Flatten`` and ``Dense``; ``Sequential`` chains them, ``train`` fits one with
softmax cross-entropy and Adam. Everything is float32 and every random draw comes from one seeded
generator, so the same numpy (run on one BLAS thread) gives the same weights.
``edgekit.local.tensor_onnx`` writes a trained ``Sequential`` as ONNX.

Imports: numpy only.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

F32 = np.float32


class Layer(ABC):
    """What every layer has: parameters and their gradients (both by name), forward and backward."""

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}

    @abstractmethod
    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray: ...

    @abstractmethod
    def backward(self, grad: np.ndarray) -> np.ndarray: ...


def _im2col(x: np.ndarray, kh: int, kw: int, ph: int, pw: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``[N, C, H, W]`` as rows of patches ``[N * OH * OW, C * kh * kw]`` (stride 1)."""
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))  # [N, C, OH, OW, kh, kw]
    n, c, oh, ow = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw), (oh, ow)


def _col2im(cols: np.ndarray, shape: tuple[int, ...], kh: int, kw: int, ph: int, pw: int, out: tuple[int, int]):
    """The adjoint of ``_im2col``: patch gradients summed back onto the input."""
    n, c, h, w = shape
    oh, ow = out
    patches = cols.reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)  # [N, C, kh, kw, OH, OW]
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i : i + oh, j : j + ow] += patches[:, :, i, j]
    return dxp[:, :, ph : ph + h, pw : pw + w]


class Conv2d(Layer):
    """Convolution of stride 1 with zero padding; weights ``[out, in, kh, kw]`` He-initialised."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], *, pad=0, rng: np.random.Generator):
        super().__init__()
        self.kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        self.pad = (pad, pad) if isinstance(pad, int) else tuple(pad)
        fan_in = cin * self.kernel[0] * self.kernel[1]
        weight = rng.standard_normal((cout, cin, *self.kernel)) * np.sqrt(2.0 / fan_in)
        self.params = {"W": weight.astype(F32), "b": np.zeros(cout, F32)}
        self.input_grad = True  # the first layer of a network needs none
        self._cache: tuple = ()

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        weight = self.params["W"]
        cols, (oh, ow) = _im2col(x, *self.kernel, *self.pad)
        out = cols @ weight.reshape(len(weight), -1).T + self.params["b"]
        if train:
            self._cache = (x.shape, cols, (oh, ow))
        return out.reshape(x.shape[0], oh, ow, len(weight)).transpose(0, 3, 1, 2)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        shape, cols, out = self._cache
        weight = self.params["W"]
        g = grad.transpose(0, 2, 3, 1).reshape(-1, len(weight))
        self.grads = {"W": (g.T @ cols).reshape(weight.shape), "b": g.sum(axis=0)}
        if not self.input_grad:
            return np.empty(0, F32)
        return _col2im(g @ weight.reshape(len(weight), -1), shape, *self.kernel, *self.pad, out)


class Conv1d(Conv2d):
    """Convolution along the last axis of ``[N, C, W]``; ``params["W"]`` is ``[out, in, 1, k]``
    (``tensor_onnx`` writes it as a 1-D Conv of weight ``[out, in, k]``)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, pad: int = 0, rng: np.random.Generator):
        super().__init__(cin, cout, (1, kernel), pad=(0, pad), rng=rng)

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        return super().forward(x[:, :, np.newaxis, :], train)[:, :, 0, :]

    def backward(self, grad: np.ndarray) -> np.ndarray:
        dx = super().backward(grad[:, :, np.newaxis, :])
        return dx[:, :, 0, :] if dx.size else dx


class ReLU(Layer):
    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        if train:
            self._mask = x > 0
        return np.maximum(x, 0)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        return grad * self._mask


class MaxPool2(Layer):
    """2x2 max pooling of stride 2; a last odd row or column is dropped (ONNX MaxPool, ceil_mode 0)."""

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        n, c, h, w = x.shape
        h2, w2 = h // 2, w // 2
        blocks = x[:, :, : 2 * h2, : 2 * w2].reshape(n, c, h2, 2, w2, 2).transpose(0, 1, 2, 4, 3, 5)
        blocks = blocks.reshape(n, c, h2, w2, 4)
        index = blocks.argmax(axis=-1)[..., np.newaxis]
        if train:
            self._cache = (x.shape, index)
        return np.take_along_axis(blocks, index, axis=-1)[..., 0]

    def backward(self, grad: np.ndarray) -> np.ndarray:
        shape, index = self._cache
        n, c, h2, w2 = grad.shape
        blocks = np.zeros((n, c, h2, w2, 4), dtype=grad.dtype)
        np.put_along_axis(blocks, index, grad[..., np.newaxis], axis=-1)
        dx = np.zeros(shape, dtype=grad.dtype)
        dx[:, :, : 2 * h2, : 2 * w2] = (
            blocks.reshape(n, c, h2, w2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * h2, 2 * w2)
        )
        return dx


class GlobalAvgPool(Layer):
    """The mean over every axis after the channels: ``[N, C, ...]`` to ``[N, C]``."""

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        self._shape = x.shape
        return x.reshape(x.shape[0], x.shape[1], -1).mean(axis=-1)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        spatial = int(np.prod(self._shape[2:]))
        return np.broadcast_to((grad / spatial).reshape(*grad.shape, *[1] * (len(self._shape) - 2)), self._shape)


class Affine(Layer):
    """``x * scale + shift`` with fixed scalars: an input normalisation carried inside the model."""

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = np.float32(scale), np.float32(shift)

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        return x * self.scale + self.shift

    def backward(self, grad: np.ndarray) -> np.ndarray:
        return grad * self.scale


class Flatten(Layer):
    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        return grad.reshape(self._shape)


class Dense(Layer):
    """``x @ W + b`` with ``W`` of shape ``[in, out]`` (ONNX Gemm without transposes)."""

    def __init__(self, fan_in: int, fan_out: int, *, rng: np.random.Generator) -> None:
        super().__init__()
        weight = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        self.params = {"W": weight.astype(F32), "b": np.zeros(fan_out, F32)}

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        if train:
            self._x = x
        return x @ self.params["W"] + self.params["b"]

    def backward(self, grad: np.ndarray) -> np.ndarray:
        self.grads = {"W": self._x.T @ grad, "b": grad.sum(axis=0)}
        return grad @ self.params["W"].T


class Sequential:
    """Layers applied in order; ``forward`` gives logits, ``probabilities`` their softmax."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        first = next(layer for layer in layers if layer.params)
        if isinstance(first, Conv2d):
            first.input_grad = False  # nothing before it learns

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, grad: np.ndarray) -> None:
        for layer in reversed(self.layers):
            grad = layer.backward(grad)

    def probabilities(self, x: np.ndarray, batch: int = 512) -> np.ndarray:
        return np.concatenate([softmax(self.forward(x[i : i + batch])) for i in range(0, len(x), batch)])

    def parameters(self) -> list[tuple[Layer, str]]:
        return [(layer, name) for layer in self.layers for name in layer.params]

    def count(self) -> int:
        return int(sum(layer.params[name].size for layer, name in self.parameters()))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def cross_entropy_grad(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """The mean softmax cross-entropy of ``logits`` against integer labels, and its gradient."""
    p = softmax(logits)
    n = len(y)
    loss = float(-np.log(p[np.arange(n), y] + 1e-12).mean())
    p[np.arange(n), y] -= 1
    return loss, (p / n).astype(F32)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4  # decoupled (AdamW), weights only
    seed: int = 0


class Adam:
    """AdamW over a ``Sequential``'s parameters, state kept per (layer, name)."""

    def __init__(self, net: Sequential, lr: float, weight_decay: float, beta1=0.9, beta2=0.999, eps=1e-8) -> None:
        self.net, self.lr, self.weight_decay = net, lr, weight_decay
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m = {key: np.zeros_like(key[0].params[key[1]]) for key in net.parameters()}
        self.v = {key: np.zeros_like(value) for key, value in self.m.items()}
        self.t = 0

    def step(self, lr: float) -> None:
        self.t += 1
        correction1, correction2 = 1 - self.beta1**self.t, 1 - self.beta2**self.t
        for layer, name in self.net.parameters():
            grad, key = layer.grads[name], (layer, name)
            self.m[key] = self.beta1 * self.m[key] + (1 - self.beta1) * grad
            self.v[key] = self.beta2 * self.v[key] + (1 - self.beta2) * grad * grad
            update = (self.m[key] / correction1) / (np.sqrt(self.v[key] / correction2) + self.eps)
            if name == "W":
                update = update + self.weight_decay * layer.params[name]
            layer.params[name] = (layer.params[name] - lr * update).astype(F32)


def train(net: Sequential, X: np.ndarray, y: np.ndarray, config: TrainConfig = TrainConfig()) -> dict[str, float]:
    """Fit ``net`` on ``X``, ``y`` (a cosine-decayed learning rate, batches shuffled by the seed);
    the last epoch's mean loss and the seconds taken."""
    rng = np.random.default_rng(config.seed)
    optimizer = Adam(net, config.lr, config.weight_decay)
    steps = config.epochs * -(-len(X) // config.batch_size)
    start, loss = time.perf_counter(), 0.0
    for _ in range(config.epochs):
        order, losses = rng.permutation(len(X)), []
        for i in range(0, len(X), config.batch_size):
            batch = order[i : i + config.batch_size]
            batch_loss, grad = cross_entropy_grad(net.forward(X[batch], train=True), y[batch])
            net.backward(grad)
            optimizer.step(config.lr * 0.5 * (1 + np.cos(np.pi * optimizer.t / steps)))
            losses.append(batch_loss)
        loss = float(np.mean(losses))
    return {"loss": loss, "seconds": time.perf_counter() - start}


def accuracy(net: Sequential, X: np.ndarray, y: np.ndarray) -> float:
    return float((net.probabilities(X).argmax(axis=1) == y).mean())
