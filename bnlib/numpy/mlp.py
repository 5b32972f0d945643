"""A fully connected network in NumPy with hand-written backpropagation: equations (5) and (6) layer by layer.

Each hidden layer ``l`` computes, for a mini-batch ``h`` of shape (N, fan_in),

* without batch normalization (eq. (5)):  ``a = f(h W^T + b)``
* with batch normalization before the activation (eq. (6)):  ``a = f(BN_{gamma, beta}(h W^T + b))``
* with ``bn_position='after'``:  ``a = BN_{gamma, beta}(f(h W^T + b))``

and the output layer is a plain affine map to the logits, trained with softmax cross-entropy. The batch
normalization forward and backward passes are :func:`bnlib.numpy.batch_norm` and
:func:`bnlib.numpy.batch_norm_backward`; this module only chains them with the linear layers and the
activations. ``bias=True`` keeps the bias ``b`` of the hidden layers even when batch normalization follows,
so that its redundancy can be measured (its gradient is exactly zero there, see chapter 3).

Shapes and conventions follow ``torch.nn``: weights are (out, in), ``W{l}``/``b{l}`` for layer ``l``,
``gamma{l}``/``beta{l}`` and the buffers ``running_mean{l}``/``running_var{l}`` for its normalization, so a
model can be copied to and from :func:`bnlib.lab.models.mlp` (see :meth:`MLP.to_torch_state_dict`).

>>> model = MLP((784, 100, 100, 10), activation="sigmoid", batch_norm=True, seed=0)
>>> history = bnlib.lab.train.train(model, data.x_train, data.y_train, steps=500, batch_size=60, lr=0.5,
...                                  x_eval=data.x_test, y_eval=data.y_test)   # the book's one loop
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .._checks import check_eps, check_momentum
from .._setup import rng as derived_rng
from .batch_norm import batch_norm, batch_norm_backward

__all__ = ["MLP", "softmax_cross_entropy", "ACTIVATIONS"]

#: Activation functions: name -> (f, derivative expressed through the input z and the output a = f(z)).
ACTIVATIONS: dict = {
    # 0.5 * (1 + tanh(z / 2)) is the logistic sigmoid without overflow warnings for large |z|.
    "sigmoid": (lambda z: 0.5 * (1.0 + np.tanh(0.5 * z)), lambda z, a: a * (1.0 - a)),
    "tanh": (np.tanh, lambda z, a: 1.0 - a * a),
    "relu": (lambda z: np.maximum(z, 0), lambda z, a: (z > 0).astype(z.dtype)),
    "identity": (lambda z: z, lambda z, a: np.ones_like(z)),
}
_POSITIONS = ("before", "after")


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray):
    """Mean cross-entropy of integer labels ``y`` under ``softmax(logits)`` and its gradient w.r.t. ``logits``.

    Uses the log-sum-exp shift, so large logits neither overflow nor lose precision.
    """
    logits = np.asarray(logits)
    y = np.asarray(y)
    if logits.ndim != 2:
        raise ValueError(f"logits: expected shape (N, classes), got {logits.shape}")
    if y.shape != (logits.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y: expected {logits.shape[0]} integer labels, got shape {y.shape} dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= logits.shape[1]):
        raise ValueError(f"y: expected labels in [0, {logits.shape[1]}), got range [{y.min()}, {y.max()}]")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_z
    n = logits.shape[0]
    loss = -log_p[np.arange(n), y].mean()
    grad = np.exp(log_p)
    grad[np.arange(n), y] -= 1.0
    return float(loss), grad / n


class MLP:
    """A multilayer perceptron with optional batch normalization in every hidden layer and manual backprop.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths, input first and number of classes last, e.g. ``(784, 100, 100, 100, 10)``.
    activation : 'sigmoid' | 'tanh' | 'relu' | 'identity'
    batch_norm : bool
        Normalize every hidden layer with batch normalization (eqs. (1)-(4)).
    bn_position : 'before' | 'after'
        Batch normalization before the activation (eq. (6), Ioffe & Szegedy) or after it.
    bias : bool
        Whether the hidden layers have a bias ``b`` (the output layer always has one).
    init : 'lecun' | 'he' | 'glorot' | float
        Weights drawn from N(0, std^2) with std = 1/sqrt(fan_in), sqrt(2/fan_in), sqrt(2/(fan_in+fan_out)),
        or the given number ("small random Gaussian" initialisation). Biases start at zero, gamma at one and
        beta at zero.
    momentum, eps : float
        Passed to :func:`bnlib.numpy.batch_norm`.
    seed : int
        Seed of the weight initialisation (``np.random.default_rng(seed)``).
    dtype : NumPy float dtype
        float32 (fast, like torch) or float64 (for gradient checks).
    """

    def __init__(
        self,
        sizes=(784, 100, 100, 100, 10),
        *,
        activation: str = "sigmoid",
        batch_norm: bool = False,
        bn_position: str = "before",
        bias: bool = True,
        init="lecun",
        momentum: float = 0.1,
        eps: float = 1e-5,
        seed: int = 0,
        dtype=np.float32,
    ):
        sizes = tuple(sizes)
        if len(sizes) < 2 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in sizes):
            raise ValueError(f"sizes: expected at least two positive ints (input, ..., classes), got {sizes!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if bn_position not in _POSITIONS:
            raise ValueError(f"bn_position: expected one of {_POSITIONS}, got {bn_position!r}")
        eps = check_eps(eps)
        momentum = check_momentum(momentum, allow_none=False)
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        if isinstance(init, str):
            if init not in ("lecun", "he", "glorot"):
                raise ValueError(f"init: expected 'lecun', 'he', 'glorot' or a positive float, got {init!r}")
        elif not (isinstance(init, (int, float)) and init > 0):
            raise ValueError(f"init: expected 'lecun', 'he', 'glorot' or a positive float, got {init!r}")

        self.sizes = sizes
        self.activation = activation
        self.batch_norm = bool(batch_norm)
        self.bn_position = bn_position
        self.bias = bool(bias)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.dtype = dtype
        self.training = True
        self.params: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self._cache: Optional[list] = None

        rng = derived_rng(seed)
        for l, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if isinstance(init, str):
                std = {"lecun": 1.0 / math.sqrt(fan_in), "he": math.sqrt(2.0 / fan_in),
                       "glorot": math.sqrt(2.0 / (fan_in + fan_out))}[init]
            else:
                std = float(init)
            self.params[f"W{l}"] = (rng.standard_normal((fan_out, fan_in)) * std).astype(dtype)
            hidden = l < self.num_hidden
            if self.bias or not hidden:
                self.params[f"b{l}"] = np.zeros(fan_out, dtype=dtype)
            if hidden and self.batch_norm:
                self.params[f"gamma{l}"] = np.ones(fan_out, dtype=dtype)
                self.params[f"beta{l}"] = np.zeros(fan_out, dtype=dtype)
                self.buffers[f"running_mean{l}"] = np.zeros(fan_out, dtype=dtype)
                self.buffers[f"running_var{l}"] = np.ones(fan_out, dtype=dtype)

    # ------------------------------------------------------------------ modes and helpers
    @property
    def num_hidden(self) -> int:
        """Number of hidden layers (each with an activation and, optionally, batch normalization)."""
        return len(self.sizes) - 2

    def train(self, mode: bool = True) -> "MLP":
        """Training mode: batch statistics, running statistics updated (like ``torch.nn.Module.train``)."""
        self.training = bool(mode)
        return self

    def eval(self) -> "MLP":
        """Inference mode: the running statistics normalize, nothing is updated."""
        return self.train(False)

    def _as_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim > 2:
            x = x.reshape(x.shape[0], -1)  # images (N, H, W) -> (N, H*W)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"x: expected shape (N, {self.sizes[0]}) or images flattening to it, got {np.shape(x)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"x: expected a floating-point array, got dtype {x.dtype}")
        return x.astype(self.dtype, copy=False)

    def _bn(self, l: int, z: np.ndarray) -> np.ndarray:
        return batch_norm(
            z, self.buffers[f"running_mean{l}"], self.buffers[f"running_var{l}"],
            weight=self.params[f"gamma{l}"], bias=self.params[f"beta{l}"],
            training=self.training, momentum=self.momentum, eps=self.eps,
        )

    # ------------------------------------------------------------------ forward and backward
    def forward(self, x) -> np.ndarray:
        """The logits for the batch ``x``; in training mode the intermediate values are kept for :meth:`backward`.

        Per hidden layer the cache keeps the layer input ``h``, the pre-activation ``z = h W^T + b``, the
        activation's input ``u`` and output ``a`` (``u`` is BN(z) for 'before', z otherwise) and, for
        'after', the normalized output. :attr:`activation_inputs` exposes the ``u`` of each layer.
        """
        h = self._as_input(x)
        f = ACTIVATIONS[self.activation][0]
        cache = []
        for l in range(self.num_hidden):
            z = h @ self.params[f"W{l}"].T
            if self.bias:
                z = z + self.params[f"b{l}"]
            entry = {"h": h, "z": z}
            if self.batch_norm and self.bn_position == "before":
                u = self._bn(l, z)
                a = f(u)
                out = a
            else:
                u = z
                a = f(u)
                out = self._bn(l, a) if self.batch_norm else a
            entry.update(u=u, a=a)
            cache.append(entry)
            h = out
        last = self.num_hidden
        logits = h @ self.params[f"W{last}"].T + self.params[f"b{last}"]
        cache.append({"h": h})
        self._cache = cache if self.training else None
        self.activation_inputs = [c["u"] for c in cache[:-1]]
        return logits

    __call__ = forward

    def backward(self, dlogits: np.ndarray) -> dict:
        """Gradients of the loss w.r.t. every parameter, given ``dlogits`` = dL/dlogits of the last forward.

        Requires the last :meth:`forward` to have run in training mode (the normalization uses batch
        statistics there, and :func:`bnlib.numpy.batch_norm_backward` differentiates through them).
        """
        if self._cache is None:
            raise RuntimeError("backward: call forward() in training mode first (model.train())")
        cache = self._cache
        dlogits = np.asarray(dlogits, dtype=self.dtype)
        last = self.num_hidden
        h = cache[-1]["h"]
        if dlogits.shape != (h.shape[0], self.sizes[-1]):
            raise ValueError(f"dlogits: expected shape {(h.shape[0], self.sizes[-1])}, got {dlogits.shape}")
        grads = {f"W{last}": dlogits.T @ h, f"b{last}": dlogits.sum(axis=0)}
        dh = dlogits @ self.params[f"W{last}"]
        fprime = ACTIVATIONS[self.activation][1]
        for l in reversed(range(self.num_hidden)):
            c = cache[l]
            if self.batch_norm and self.bn_position == "after":
                da, grads[f"gamma{l}"], grads[f"beta{l}"] = batch_norm_backward(
                    dh, c["a"], self.params[f"gamma{l}"], eps=self.eps)
                dz = da * fprime(c["u"], c["a"])
            elif self.batch_norm:  # before the activation: a = f(BN(z))
                du = dh * fprime(c["u"], c["a"])
                dz, grads[f"gamma{l}"], grads[f"beta{l}"] = batch_norm_backward(
                    du, c["z"], self.params[f"gamma{l}"], eps=self.eps)
            else:
                dz = dh * fprime(c["u"], c["a"])
            grads[f"W{l}"] = dz.T @ c["h"]
            if self.bias:
                grads[f"b{l}"] = dz.sum(axis=0)
            if l > 0:  # the gradient w.r.t. the network's input is not needed
                dh = dz @ self.params[f"W{l}"]
        return {k: np.asarray(v, dtype=self.dtype) for k, v in grads.items()}

    def loss(self, x, y) -> float:
        """Mean softmax cross-entropy on ``(x, y)`` in the current mode."""
        return softmax_cross_entropy(self.forward(x), y)[0]

    def loss_and_grads(self, x, y):
        """``(loss, grads)`` for one mini-batch: forward in the current mode, then :meth:`backward`."""
        loss, dlogits = softmax_cross_entropy(self.forward(x), y)
        return loss, self.backward(dlogits)

    def sgd_step(self, grads: dict, lr: float) -> None:
        """Plain gradient descent: ``p -= lr * grad`` for every parameter in ``grads``."""
        for name, g in grads.items():
            if name not in self.params:
                raise KeyError(f"grads: unknown parameter {name!r}")
            self.params[name] -= np.asarray(lr * g, dtype=self.dtype)

    def evaluate(self, x, y, batch_size: int = 1000):
        """(mean cross-entropy, accuracy) in eval mode (running statistics); the mode is restored afterwards."""
        was_training = self.training
        self.eval()
        x = self._as_input(x)
        y = np.asarray(y)
        total, correct = 0.0, 0
        try:
            for i in range(0, len(x), batch_size):
                logits = self.forward(x[i: i + batch_size])
                loss, _ = softmax_cross_entropy(logits.astype(np.float64), y[i: i + batch_size])
                total += loss * len(logits)
                correct += int((logits.argmax(axis=1) == y[i: i + batch_size]).sum())
        finally:
            self.train(was_training)
        return total / len(x), correct / len(x)

    # ------------------------------------------------------------------ interchange with torch
    def torch_names(self) -> dict:
        """Parameter and buffer names -> the state-dict keys of the same layout in :func:`bnlib.lab.models.mlp`.

        ``bnlib.lab.models.mlp(sizes[0], sizes[1:-1], sizes[-1], activation=..., norm='bn' or 'none',
        norm_position=..., bias=...)`` numbers its ``nn.Sequential`` children: Flatten, then per hidden layer
        Linear, BatchNorm and activation (in the model's order), then the output Linear.
        """
        names, index = {}, 1  # child 0 is Flatten
        per_layer = 3 if self.batch_norm else 2
        for l in range(self.num_hidden + 1):
            names[f"W{l}"] = f"{index}.weight"
            if f"b{l}" in self.params:
                names[f"b{l}"] = f"{index}.bias"
            if l < self.num_hidden and self.batch_norm:
                bn = index + (1 if self.bn_position == "before" else 2)
                names.update({f"gamma{l}": f"{bn}.weight", f"beta{l}": f"{bn}.bias",
                              f"running_mean{l}": f"{bn}.running_mean", f"running_var{l}": f"{bn}.running_var"})
            index += per_layer
        return names

    def to_torch_state_dict(self) -> dict:
        """The parameters and buffers as a torch state dict for :func:`bnlib.lab.models.mlp` (see :meth:`torch_names`).

        ``num_batches_tracked`` is not tracked here and is left out; load with ``strict=False`` when the torch
        model's norm layers have that buffer (``torch.nn.BatchNorm1d`` tolerates its absence).
        """
        import torch

        state = {**self.params, **self.buffers}
        return {key: torch.from_numpy(state[name].copy()) for name, key in self.torch_names().items()}
