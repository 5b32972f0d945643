"""Internal covariate shift under the microscope: the measurements of chapter 5.

Everything here observes a model without disturbing its training: parameters, buffers (batch-norm running
statistics) and the noise of :class:`NoisyBatchNorm1d`/``2d`` are restored after each measurement
(:func:`frozen_state`), so measuring during training changes nothing about the run.

Activations
    :class:`ActivationRecorder` (a :class:`bnlib.lab.probes.ActivationProbe`), :func:`capture` (one forward
    pass, outputs of chosen modules as ``(rows, units)`` matrices), :func:`pre_activation_modules` /
    :func:`weight_layers` (find them in a ``Sequential``), :func:`wasserstein1` and :func:`relative_drift`
    (how far a unit's distribution moved).
Internal covariate shift (Santurkar et al. 2018)
    :func:`deep_linear` (the deep linear network they also measured), :func:`ics`: for layer ``i``,
    ``||G - G'||_2`` and ``cos(G, G')``, where ``G`` is the gradient of the loss
    w.r.t. layer ``i``'s weight and ``G'`` the same gradient after the layers before ``i`` took their SGD step.
Noisy batch norm
    :class:`NoisyBatchNorm1d`, :class:`NoisyBatchNorm2d` (``bnlib.torch`` batch norm followed by a per-unit
    random affine map whose distribution is re-drawn at every training step) and :func:`add_noise`.
Loss landscape
    :func:`landscape_probe`: walk along the gradient direction and record the loss, the change of the
    gradient and the effective beta-smoothness, at given step sizes ``eta`` or at matched step lengths ``d``
    (the same distance in parameter space whatever the gradient's size).
Scale invariance
    :func:`scale_invariance`, :func:`effective_lr`, :func:`angular_update`, :func:`weight_norm`.
Training callback
    :class:`Microscope` (all of the above at chosen intervals, for :func:`bnlib.lab.train.train`) and
    :func:`rolling_median` (to plot its noisy per-step series).
Training speed
    :func:`steps_to_sustained_accuracy`: when the test accuracy, averaged over a window of steps, first reaches
    a target (one lucky evaluation does not count).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from .. import torch as bt
from .._setup import generator
from .probes import ActivationProbe, rows

__all__ = [
    "frozen_state", "ActivationRecorder", "capture", "pre_activation_modules", "weight_layers",
    "wasserstein1", "relative_drift", "deep_linear",
    "ICSResult", "ics", "parameter_groups",
    "NoisyBatchNorm1d", "NoisyBatchNorm2d", "add_noise",
    "LandscapeResult", "landscape_probe",
    "scale_invariance", "effective_lr", "angular_update", "weight_norm",
    "Microscope", "MicroscopeRecord", "rolling_median", "steps_to_sustained_accuracy",
]

_ACTIVATION_TYPES = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU)
_WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ----------------------------------------------------------------------------------------------------------
# Helpers: validation, freezing state


def _check_module(name: str, value) -> None:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(value).__name__}")


@contextlib.contextmanager
def frozen_state(model: nn.Module):
    """Run measurements on ``model`` and leave no trace.

    On entry the parameters' values and all buffers (running statistics, ``num_batches_tracked``) are copied;
    on exit they are written back. While inside, :class:`NoisyBatchNorm1d`/``2d`` layers keep their current
    noise instead of drawing new noise at each forward pass, so repeated forward passes see the same network.
    Gradients stored in ``.grad`` are not touched by the measurements here (they use ``torch.autograd.grad``).
    """
    _check_module("model", model)
    params = [(p, p.detach().clone()) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    noisy = [m for m in model.modules() if isinstance(m, _NoisyMixin)]
    held = [(m._hold, m._sample_z, m._gen.get_state()) for m in noisy]
    for m in noisy:
        m._hold = True
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, saved in params:
                p.copy_(saved)
            for b, saved in buffers:
                b.copy_(saved)
        for m, (hold, z, gen_state) in zip(noisy, held):
            m._hold, m._sample_z = hold, z
            m._gen.set_state(gen_state)


# ----------------------------------------------------------------------------------------------------------
# Activations


class ActivationRecorder(ActivationProbe):
    """Forward hooks that keep the latest output of each chosen module, as a ``(rows, units)`` matrix: an
    :class:`bnlib.lab.probes.ActivationProbe` (``reduce='rows'``) that keeps only the latest record.

    >>> with ActivationRecorder({"layer1": model[2]}) as rec:
    ...     model(x)
    >>> rec.outputs["layer1"].shape   # (N, 100) after a Linear/BN of 100 units; (N*H*W, C) after a conv

    Outputs are detached copies (``float32``, on the model's device). ``modules`` is a mapping name -> module
    or a sequence of modules (named ``"0"``, ``"1"``, ...).
    """

    def __init__(self, modules):
        if isinstance(modules, Mapping):
            items = list(modules.items())
        elif isinstance(modules, (list, tuple)):
            items = [(str(i), m) for i, m in enumerate(modules)]
        else:
            raise TypeError(f"modules: expected a mapping name -> module or a list of modules, got "
                            f"{type(modules).__name__}")
        if not items:
            raise ValueError("modules: expected at least one module to record")
        for name, m in items:
            _check_module(f"modules[{name!r}]", m)
        super().__init__(None, dict(items), what="output", reduce=rows)

    def _store(self, name, value):
        self.records[name] = [value]  # only the latest output

    @property
    def outputs(self) -> Dict[str, Tensor]:
        """name -> the latest output of that module (modules that have not run are left out)."""
        return {name: values[-1] for name, values in self.records.items() if values}

    def __enter__(self):
        self.clear()
        return super().__enter__()


def capture(model: nn.Module, x: Tensor, modules) -> Dict[str, Tensor]:
    """One forward pass of ``x`` in the model's current mode (training mode: batch statistics), returning
    the outputs of ``modules`` as ``(rows, units)`` matrices. Running statistics and noise are left as they
    were (:func:`frozen_state`)."""
    _check_module("model", model)
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    with frozen_state(model), torch.no_grad(), ActivationRecorder(modules) as rec:
        model(x)
    return rec.outputs


def pre_activation_modules(model: nn.Sequential) -> Dict[str, nn.Module]:
    """The modules whose output feeds each nonlinearity of a ``Sequential``, named ``layer1``, ``layer2``, ...

    For ``Linear -> BN -> sigmoid`` that is the BN (its output is the sigmoid's input); for
    ``Linear -> sigmoid`` it is the Linear."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model: expected an nn.Sequential (bnlib.lab.models.mlp / small_cnn), got "
                        f"{type(model).__name__}")
    found = {}
    children = list(model)
    for i, m in enumerate(children):
        if isinstance(m, _ACTIVATION_TYPES) and i > 0:
            found[f"layer{len(found) + 1}"] = children[i - 1]
    if not found:
        raise ValueError("model: found no nonlinearity (ReLU, Sigmoid, Tanh, ...) preceded by a layer")
    return found


def weight_layers(model: nn.Module) -> List[nn.Module]:
    """The Linear/Conv layers of ``model`` in registration (= forward, for a Sequential) order."""
    _check_module("model", model)
    layers = [m for m in model.modules() if isinstance(m, _WEIGHT_TYPES)]
    if not layers:
        raise ValueError("model: found no Linear or Conv layer")
    return layers


def wasserstein1(a: Tensor, b: Tensor) -> Tensor:
    """Per-column 1-Wasserstein distance between the empirical distributions in ``a`` and ``b`` (both
    ``(rows, units)`` with the same number of rows): ``mean_k |sort(a)_k - sort(b)_k|``."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        raise TypeError("a, b: expected torch.Tensors")
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a, b: expected two (rows, units) tensors of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return (a.sort(0).values - b.sort(0).values).abs().mean(0)


def relative_drift(a: Tensor, b: Tensor) -> Tensor:
    """How far each unit's distribution moved from ``a`` to ``b``, in units of its spread in ``a``:
    ``W1(a_j, b_j) / std(a_j)``. Scale-free, so networks with and without BN can be compared."""
    return wasserstein1(a, b) / a.std(0).clamp_min(1e-12)


def deep_linear(in_features: int = 784, depth: int = 10, width: int = 50, out_features: int = 10, *,
                norm: str = "none") -> nn.Sequential:
    """A deep *linear* network (Santurkar et al. measured ICS on one): Flatten -> [Linear -> (BN)] * depth ->
    Linear, no nonlinearity. Weights are drawn from N(0, 1/fan_in) so that, without BN, the signal neither
    explodes nor vanishes with depth (PyTorch's default uniform init shrinks its variance 3x per layer).
    ``norm`` is 'none' or 'bn' (``bnlib.torch.BatchNorm1d``; the Linear then has no bias)."""
    if norm not in ("none", "bn"):
        raise ValueError(f"norm: expected 'none' or 'bn', got {norm!r}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth: expected a positive int, got {depth!r}")
    layers: List[nn.Module] = [nn.Flatten()]
    w = in_features
    for _ in range(depth):
        layers.append(nn.Linear(w, width, bias=(norm == "none")))
        if norm == "bn":
            layers.append(bt.BatchNorm1d(width))
        w = width
    layers.append(nn.Linear(w, out_features))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------------
# Internal covariate shift


def parameter_groups(model: nn.Module, layers: Sequence[nn.Module]) -> List[List[nn.Parameter]]:
    """Split the trainable parameters of ``model`` into one group per entry of ``layers``.

    A parameter belongs to the group of the last layer registered before it (so a BN's gamma and beta join
    the Linear/Conv in front of them); parameters registered before the first layer join group 0."""
    layer_params = {id(l.weight): k for k, l in enumerate(layers)}
    if len(layer_params) != len(layers):
        raise ValueError("layers: expected distinct layers, each with a .weight")
    groups: List[List[nn.Parameter]] = [[] for _ in layers]
    current = 0
    seen = set()
    for p in model.parameters():
        if not p.requires_grad:
            continue
        current = layer_params.get(id(p), current)
        seen.add(id(p))
        groups[current].append(p)
    missing = [k for k, l in enumerate(layers) if id(l.weight) not in seen]
    if missing:
        raise ValueError(f"layers: layers {missing} are not (trainable) parts of model")
    return groups


@dataclass
class ICSResult:
    """Per-layer internal covariate shift at one step (arrays indexed by layer)."""

    l2: np.ndarray          # ||G - G'||_2
    cosine: np.ndarray      # cos(G, G')
    grad_norm: np.ndarray   # ||G||_2

    @property
    def relative(self) -> np.ndarray:
        """||G - G'|| / ||G||."""
        return self.l2 / np.maximum(self.grad_norm, 1e-30)


def ics(model: nn.Module, closure: Callable[[], Tensor], lr: float,
        layers: Optional[Sequence[nn.Module]] = None) -> ICSResult:
    """Internal covariate shift of each layer in the sense of Santurkar et al. (2018).

    ``closure()`` returns the loss of ``model`` on a fixed batch. For layer ``i`` (weight ``W_i``):
    ``G = dL/dW_i`` at the current parameters; ``G'`` = the same gradient after every earlier layer (groups
    ``0..i-1`` of :func:`parameter_groups`) took its SGD step ``theta <- theta - lr * dL/dtheta`` computed on
    the same batch, with layer ``i`` and the later ones unchanged. Returns ``||G - G'||``, ``cos(G, G')`` and
    ``||G||`` per layer; layer 0 has nothing before it, so its shift is 0 and its cosine 1.
    The model is left exactly as it was (:func:`frozen_state`).
    """
    _check_module("model", model)
    if not callable(closure):
        raise TypeError("closure: expected a callable returning the loss")
    _checks.check_real("lr", lr, 0.0)
    layers = list(weight_layers(model) if layers is None else layers)
    groups = parameter_groups(model, layers)
    flat = [p for g in groups for p in g]
    l2, cos, gnorm = [], [], []
    with frozen_state(model):
        grads = torch.autograd.grad(closure(), flat, allow_unused=True)
        grads = {id(p): (torch.zeros_like(p) if g is None else g) for p, g in zip(flat, grads)}
        for i, layer in enumerate(layers):
            G = grads[id(layer.weight)]
            if i == 0:
                Gp = G
            else:
                with torch.no_grad():
                    for p in groups[i - 1]:  # groups 0..i-2 were stepped already in earlier iterations
                        p.sub_(lr * grads[id(p)])
                (Gp,) = torch.autograd.grad(closure(), [layer.weight])
            n1, n2 = G.norm().item(), Gp.norm().item()
            gnorm.append(n1)
            if i == 0:  # nothing before the first layer moves: G' = G exactly
                l2.append(0.0)
                cos.append(1.0)
                continue
            l2.append((G - Gp).norm().item())
            cos.append(float((G * Gp).sum().item() / (n1 * n2)) if n1 > 0 and n2 > 0 else 1.0)
    return ICSResult(np.array(l2), np.array(cos), np.array(gnorm))


# ----------------------------------------------------------------------------------------------------------
# Noisy batch norm


class _NoisyMixin:
    """Batch norm followed, in training, by a random per-unit affine map re-drawn at every training step:

    ``y = s * BN(x) + m + sample_noise * z`` with, for unit ``j`` at step ``t``,
    ``m_tj ~ U(-mean_noise, mean_noise)``, ``log s_tj ~ U(-log scale_noise, log scale_noise)`` and
    ``z ~ N(0, 1)`` drawn for every sample and unit.

    So the layer's output no longer has the mean ``beta`` and standard deviation ``gamma`` that batch norm
    guarantees: its distribution jumps at every step (non-zero mean, non-unit variance), which is Santurkar et
    al.'s "noisy BatchNorm". In evaluation mode no noise is added. New noise is drawn at each training-mode
    forward pass, except inside :func:`frozen_state` (measurements reuse the current draw).
    """

    def _init_noise(self, mean_noise: float, scale_noise: float, sample_noise: float, seed: int) -> None:
        _checks.check_real("mean_noise", mean_noise, 0.0)
        _checks.check_real("scale_noise", scale_noise, 0.0, open_low=True)
        if scale_noise < 1:
            raise ValueError(f"scale_noise: expected a number >= 1 (scales are drawn in [1/s, s]), got "
                             f"{scale_noise!r}")
        _checks.check_real("sample_noise", sample_noise, 0.0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.mean_noise = float(mean_noise)
        self.scale_noise = float(scale_noise)
        self.sample_noise = float(sample_noise)
        self._gen = generator(seed)
        self._hold = False
        self.noise_enabled = True
        self.register_buffer("noise_shift", torch.zeros(self.num_features), persistent=False)
        self.register_buffer("noise_scale", torch.ones(self.num_features), persistent=False)
        self._sample_z: Optional[Tensor] = None

    def resample(self) -> None:
        """Draw a new noise distribution (per-unit shift and scale) for the next step."""
        c = self.num_features
        shift = (torch.rand(c, generator=self._gen) * 2 - 1) * self.mean_noise
        log_s = (torch.rand(c, generator=self._gen) * 2 - 1) * math.log(self.scale_noise)
        self.noise_shift.copy_(shift)
        self.noise_scale.copy_(log_s.exp())
        self._sample_z = None

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)
        if not (self.training and self.noise_enabled):
            return out
        if not self._hold:
            self.resample()
        view = (1, -1) + (1,) * (out.dim() - 2)
        out = out * self.noise_scale.view(view) + self.noise_shift.view(view)
        if self.sample_noise > 0:
            if self._sample_z is None or self._sample_z.shape != out.shape:
                self._sample_z = torch.randn(out.shape, generator=self._gen).to(out.device, out.dtype)
            out = out + self.sample_noise * self._sample_z
        return out

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", mean_noise={self.mean_noise}, scale_noise={self.scale_noise}, "
                f"sample_noise={self.sample_noise}")


class NoisyBatchNorm1d(_NoisyMixin, bt.BatchNorm1d):
    """:class:`bnlib.torch.BatchNorm1d` with time-varying noise after it (see :class:`_NoisyMixin`)."""

    def __init__(self, num_features: int, *args, mean_noise: float = 1.0, scale_noise: float = 2.0,
                 sample_noise: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self._init_noise(mean_noise, scale_noise, sample_noise, seed)


class NoisyBatchNorm2d(_NoisyMixin, bt.BatchNorm2d):
    """:class:`bnlib.torch.BatchNorm2d` with time-varying noise after it (see :class:`_NoisyMixin`)."""

    def __init__(self, num_features: int, *args, mean_noise: float = 1.0, scale_noise: float = 2.0,
                 sample_noise: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self._init_noise(mean_noise, scale_noise, sample_noise, seed)


def add_noise(model: nn.Module, *, mean_noise: float = 1.0, scale_noise: float = 2.0,
              sample_noise: float = 0.0, seed: int = 0) -> nn.Module:
    """Replace every ``bnlib.torch`` ``BatchNorm1d``/``BatchNorm2d`` in ``model`` (in place) by its noisy twin,
    keeping its parameters and running statistics; the k-th layer gets noise seed ``seed + k``. Returns
    ``model``. Raises ``ValueError`` if the model has no such layer."""
    _check_module("model", model)
    targets = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) in (bt.BatchNorm1d, bt.BatchNorm2d):
                targets.append((parent, name, child))
    if not targets:
        raise ValueError("model: found no bnlib.torch BatchNorm1d/BatchNorm2d layer to make noisy")
    for k, (parent, name, child) in enumerate(targets):
        cls = NoisyBatchNorm1d if isinstance(child, bt.BatchNorm1d) else NoisyBatchNorm2d
        noisy = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                    bias=child.bias is not None, backend=child.backend, mean_noise=mean_noise,
                    scale_noise=scale_noise, sample_noise=sample_noise, seed=seed + k)
        ref = child.weight if child.weight is not None else next(
            (b for b in child.buffers() if b.is_floating_point()), None)
        if ref is not None:
            noisy.to(device=ref.device, dtype=ref.dtype)
        noisy.load_state_dict(child.state_dict())
        noisy.train(child.training)
        setattr(parent, name, noisy)
    return model


# ----------------------------------------------------------------------------------------------------------
# Loss landscape along the gradient


@dataclass
class LandscapeResult:
    """What :func:`landscape_probe` saw along ``theta - eta * g`` (arrays indexed by step size; with matched step
    lengths ``eta = d / ||g||``)."""

    step_sizes: np.ndarray
    loss0: float             # L(theta)
    grad_norm: float         # ||g||
    losses: np.ndarray       # L(theta - eta g)
    grad_change: np.ndarray  # ||grad L(theta - eta g) - g||
    distance: np.ndarray     # ||eta g|| = eta ||g||

    @property
    def loss_range(self) -> float:
        """Loss variation: max - min of the loss over theta and all probed points."""
        values = np.append(self.losses, self.loss0)
        return float(values.max() - values.min())

    @property
    def grad_predictiveness(self) -> float:
        """Largest l2 change of the gradient along the probe (smaller = more predictive gradients)."""
        return float(self.grad_change.max())

    @property
    def beta_smoothness(self) -> float:
        """Effective beta-smoothness: largest gradient change per unit distance moved."""
        ok = self.distance > 0
        return float((self.grad_change[ok] / self.distance[ok]).max()) if ok.any() else 0.0


def landscape_probe(model: nn.Module, closure: Callable[[], Tensor], step_sizes=None,
                    params: Optional[Sequence[nn.Parameter]] = None, *, distances=None) -> LandscapeResult:
    """Move from the current parameters along the negative gradient, ``theta - eta * g`` for each ``eta`` in
    ``step_sizes``, and record the loss and how much the gradient changed (Santurkar et al. 2018, Fig. 4).

    With ``distances`` instead of ``step_sizes`` the probe moves a *matched step length*: to
    ``theta - d * g / ||g||`` for each ``d``, i.e. ``eta = d / ||g||``, so that networks whose gradients differ
    in size are compared at the same distance moved in parameter space (a gradient of zero moves nowhere).

    ``closure()`` returns the loss of ``model`` on a fixed batch; ``params`` defaults to all trainable
    parameters. The model is left exactly as it was (:func:`frozen_state`).
    """
    _check_module("model", model)
    if not callable(closure):
        raise TypeError("closure: expected a callable returning the loss")
    if (step_sizes is None) == (distances is None):
        raise ValueError("step_sizes, distances: give exactly one of them")
    name, given = ("step_sizes", step_sizes) if distances is None else ("distances", distances)
    values = np.asarray(given, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{name}: expected a non-empty list of positive finite numbers, got {given!r}")
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("params: expected at least one trainable parameter")
    losses, changes = [], []
    with frozen_state(model):
        loss0 = closure()
        g0 = [g.detach().clone() for g in torch.autograd.grad(loss0, params)]
        gnorm = math.sqrt(sum(float((g * g).sum()) for g in g0))
        if distances is None:
            etas = values
        else:
            etas = values / gnorm if gnorm > 0 else np.zeros_like(values)
        start = [p.detach().clone() for p in params]
        for eta in etas:
            with torch.no_grad():
                for p, s, g in zip(params, start, g0):
                    p.copy_(s - float(eta) * g)
            loss = closure()
            grads = torch.autograd.grad(loss, params)
            losses.append(float(loss.detach()))
            changes.append(math.sqrt(sum(float(((g - h) ** 2).sum()) for g, h in zip(grads, g0))))
    return LandscapeResult(etas, float(loss0.detach()), gnorm, np.array(losses), np.array(changes),
                           etas * gnorm if distances is None else (values if gnorm > 0 else np.zeros_like(values)))


# ----------------------------------------------------------------------------------------------------------
# Scale invariance


def weight_norm(module: nn.Module) -> float:
    """Frobenius norm of ``module.weight``."""
    _check_module("module", module)
    return float(module.weight.detach().norm())


def effective_lr(lr: float, weight_norm_value: float) -> float:
    """The learning rate a scale-invariant weight ``w`` effectively sees: ``lr / ||w||^2``.

    If ``f(c w) = f(w)`` for all ``c > 0`` then ``grad f(c w) = grad f(w) / c``, so the step on the
    direction ``w / ||w||`` (the only thing that matters) is ``lr / ||w||^2`` times the gradient
    with respect to that direction."""
    _checks.check_real("lr", lr, 0.0)
    _checks.check_real("weight_norm_value", weight_norm_value, 0.0, open_low=True)
    return lr / weight_norm_value ** 2


def angular_update(w_old: Tensor, w_new: Tensor) -> float:
    """Angle (radians) between two weight tensors, flattened: how far the direction moved."""
    if not (isinstance(w_old, Tensor) and isinstance(w_new, Tensor)):
        raise TypeError("w_old, w_new: expected torch.Tensors")
    if w_old.shape != w_new.shape:
        raise ValueError(f"w_old, w_new: shapes differ, {tuple(w_old.shape)} vs {tuple(w_new.shape)}")
    a, b = w_old.detach().reshape(-1).double(), w_new.detach().reshape(-1).double()
    c = float((a @ b) / (a.norm() * b.norm()))
    return math.acos(max(-1.0, min(1.0, c)))


def scale_invariance(model: nn.Module, layer: nn.Module, closure: Callable[[], Tensor],
                     scales=(0.1, 0.5, 2.0, 10.0), x: Optional[Tensor] = None) -> dict:
    """Check numerically that ``model`` does not care about the scale of ``layer.weight`` (as when ``layer``
    is followed by batch norm).

    For each ``c`` in ``scales`` the weight is multiplied by ``c`` and we record:

    - ``loss_change``: ``|L(cW) - L(W)|`` (0 if invariant);
    - ``output_change``: max ``|f(cW; x) - f(W; x)|`` over the logits, when ``x`` is given;
    - ``grad_ratio``: ``c * ||dL/dW at cW|| / ||dL/dW at W||`` (1 if invariant: the gradient shrinks as 1/c);
    - ``radial``: ``<G, W> / (||G|| ||W||)`` at the unscaled weight (0 if invariant: the gradient is orthogonal
      to the weight, so SGD without weight decay can only grow ``||W||``).
    """
    _check_module("model", model)
    _check_module("layer", layer)
    scales = [float(c) for c in scales]
    if not scales or any(not math.isfinite(c) or c <= 0 for c in scales):
        raise ValueError(f"scales: expected positive finite numbers, got {scales!r}")
    out = {"scales": np.array(scales), "loss_change": [], "output_change": [], "grad_ratio": []}
    with frozen_state(model):
        w0 = layer.weight.detach().clone()
        loss0 = closure()
        (g0,) = torch.autograd.grad(loss0, [layer.weight])
        out["radial"] = float((g0 * w0).sum() / (g0.norm() * w0.norm()).clamp_min(1e-30))
        y0 = None
        if x is not None:
            with torch.no_grad():
                y0 = model(x)
        for c in scales:
            with torch.no_grad():
                layer.weight.copy_(c * w0)
            loss = closure()
            (g,) = torch.autograd.grad(loss, [layer.weight])
            out["loss_change"].append(abs(float(loss.detach()) - float(loss0.detach())))
            out["grad_ratio"].append(c * float(g.norm()) / max(float(g0.norm()), 1e-30))
            if x is not None:
                with torch.no_grad():
                    out["output_change"].append(float((model(x) - y0).abs().max()))
    for k in ("loss_change", "output_change", "grad_ratio"):
        out[k] = np.array(out[k])
    return out


def rolling_median(values, window: int = 5) -> np.ndarray:
    """Centred rolling median along axis 0 (the window shrinks at the ends), for plotting noisy per-step
    measurements."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window: expected a positive int, got {window!r}")
    a = np.asarray(values, dtype=np.float64)
    half = window // 2
    return np.stack([np.median(a[max(0, i - half): i + half + 1], axis=0) for i in range(len(a))]) if len(a) \
        else a


def steps_to_sustained_accuracy(history, target: float, window: int = 50) -> Optional[int]:
    """The first evaluation step ``s`` at which the mean test accuracy over the evaluations of the last
    ``window`` steps, ``s - window < step <= s``, reaches ``target``; ``None`` if it never does.

    ``history`` is a :class:`bnlib.lab.train.History` (``eval_steps``, ``eval_acc``). Unlike
    :func:`bnlib.lab.train.steps_to_accuracy` (the first single evaluation at or above ``target``), one lucky
    evaluation on a slowly rising, noisy curve does not count, so the result moves little when the run itself
    moves a little (another seed of the evaluation noise, another processor's rounding). Evaluate often
    (several evaluations per window). Before step ``window`` the average includes the evaluation at step 0.
    """
    if not (isinstance(target, numbers.Real) and not isinstance(target, bool) and 0 < target <= 1):
        raise ValueError(f"target: expected an accuracy in (0, 1], got {target!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window: expected a positive int (steps), got {window!r}")
    steps = np.asarray(getattr(history, "eval_steps", None), dtype=np.float64)
    acc = np.asarray(getattr(history, "eval_acc", None), dtype=np.float64)
    if steps.ndim != 1 or steps.shape != acc.shape:
        raise ValueError("history: expected eval_steps and eval_acc of the same length")
    for s in steps:
        inside = (steps > s - window) & (steps <= s)
        if acc[inside].mean() >= target:
            return int(s)
    return None


# ----------------------------------------------------------------------------------------------------------
# The training callback


@dataclass
class MicroscopeRecord:
    """Measurements taken during one training run (see :class:`Microscope`)."""

    act_steps: List[int] = field(default_factory=list)
    activations: Dict[str, List[np.ndarray]] = field(default_factory=dict)  # name -> list of (rows, units)
    ics_steps: List[int] = field(default_factory=list)
    ics_l2: List[np.ndarray] = field(default_factory=list)       # per layer
    ics_cosine: List[np.ndarray] = field(default_factory=list)
    ics_grad_norm: List[np.ndarray] = field(default_factory=list)
    land_steps: List[int] = field(default_factory=list)
    landscapes: List[LandscapeResult] = field(default_factory=list)
    matched: List[LandscapeResult] = field(default_factory=list)  # at matched step lengths (``distances``)
    norm_steps: List[int] = field(default_factory=list)
    weight_norms: List[np.ndarray] = field(default_factory=list)
    grad_norms: List[np.ndarray] = field(default_factory=list)  # ||W.grad|| of the step just taken (nan at 0)
    angles: List[np.ndarray] = field(default_factory=list)

    def stacked(self, name: str) -> np.ndarray:
        """Activations of ``name`` over time as one array (checkpoints, rows, units)."""
        return np.stack(self.activations[name])

    def drift(self, name: str, lag: int = 1) -> np.ndarray:
        """:func:`relative_drift` of every unit of ``name`` between checkpoints ``k`` and ``k + lag``:
        an array (checkpoints - lag, units)."""
        acts = [torch.from_numpy(a) for a in self.activations[name]]
        return np.stack([relative_drift(acts[k], acts[k + lag]).numpy() for k in range(len(acts) - lag)])


class Microscope:
    """A callback for :func:`bnlib.lab.train.train` that measures, without disturbing the run:

    - every ``act_every`` steps: the outputs of ``act_modules`` (default: the inputs of the nonlinearities,
      :func:`pre_activation_modules`) on the fixed ``probe_x`` batch, in training mode;
    - every ``ics_every`` steps: :func:`ics` on the current training batch with learning rate ``lr``;
    - every ``landscape_every`` steps: :func:`landscape_probe` with ``step_sizes`` on the current batch (in
      ``record.landscapes``) and, when ``distances`` is given, at those matched step lengths too (in
      ``record.matched``);
    - every ``norm_every`` steps: the norms of the weight layers, of their gradients (those of the step just
      taken) and the angle each weight turned since the last record.

    An interval of 0 switches a measurement off. Call :meth:`start` before training to record step 0.
    Results are in ``self.record`` (:class:`MicroscopeRecord`).
    """

    def __init__(self, *, lr: float, probe_x: Optional[Tensor] = None, act_every: int = 0, ics_every: int = 0,
                 landscape_every: int = 0, norm_every: int = 0, step_sizes=(0.5, 1.0, 2.0, 4.0),
                 distances=None, act_modules=None, layers: Optional[Sequence[nn.Module]] = None,
                 loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy):
        _checks.check_real("lr", lr, 0.0)
        for name, v in (("act_every", act_every), ("ics_every", ics_every),
                        ("landscape_every", landscape_every), ("norm_every", norm_every)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0 (0 = off), got {v!r}")
        if act_every and probe_x is None:
            raise ValueError("probe_x: needed when act_every > 0")
        self.lr, self.probe_x, self.loss = lr, probe_x, loss
        self.act_every, self.ics_every = act_every, ics_every
        self.landscape_every, self.norm_every = landscape_every, norm_every
        self.step_sizes = list(step_sizes)
        self.distances = None
        if distances is not None:
            d = np.asarray(distances, dtype=np.float64).reshape(-1)
            if d.size == 0 or not np.all(np.isfinite(d)) or np.any(d <= 0):
                raise ValueError(f"distances: expected a non-empty list of positive finite numbers (or None), got "
                                 f"{distances!r}")
            self.distances = d.tolist()
        self.act_modules, self.layers = act_modules, layers
        self.record = MicroscopeRecord()
        self._last_weights = None

    def _resolve(self, model):
        if self.act_every and self.act_modules is None:
            self.act_modules = pre_activation_modules(model)
        if self.layers is None:
            self.layers = weight_layers(model)

    def _activations(self, step, model):
        outs = capture(model, self.probe_x, self.act_modules)
        self.record.act_steps.append(step)
        for name, value in outs.items():
            self.record.activations.setdefault(name, []).append(value.cpu().numpy())

    def _norms(self, step, model):
        weights = [l.weight.detach().clone() for l in self.layers]
        self.record.norm_steps.append(step)
        self.record.weight_norms.append(np.array([float(w.norm()) for w in weights]))
        self.record.grad_norms.append(np.array([float(l.weight.grad.norm()) if l.weight.grad is not None
                                                else float("nan") for l in self.layers]))
        if self._last_weights is None:
            self.record.angles.append(np.zeros(len(weights)))
        else:
            self.record.angles.append(np.array([angular_update(a, b) for a, b in zip(self._last_weights, weights)]))
        self._last_weights = weights

    def start(self, model: nn.Module) -> None:
        """Record the step-0 activations and weight norms (call before training)."""
        self._resolve(model)
        if self.act_every:
            self._activations(0, model)
        if self.norm_every:
            self._norms(0, model)

    def __call__(self, step: int, model: nn.Module, xb: Tensor, yb: Tensor) -> None:
        self._resolve(model)

        def closure():
            return self.loss(model(xb), yb)

        if self.act_every and step % self.act_every == 0:
            self._activations(step, model)
        if self.norm_every and step % self.norm_every == 0:
            self._norms(step, model)
        if self.ics_every and step % self.ics_every == 0:
            r = ics(model, closure, self.lr, self.layers)
            self.record.ics_steps.append(step)
            self.record.ics_l2.append(r.l2)
            self.record.ics_cosine.append(r.cosine)
            self.record.ics_grad_norm.append(r.grad_norm)
        if self.landscape_every and step % self.landscape_every == 0:
            self.record.land_steps.append(step)
            self.record.landscapes.append(landscape_probe(model, closure, self.step_sizes))
            if self.distances is not None:
                self.record.matched.append(landscape_probe(model, closure, distances=self.distances))
