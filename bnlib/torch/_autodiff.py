r"""The differentiable side of the hand-written normalizations: double backward, forward mode and ``torch.func``.

Every normalization here standardizes a set of ``M`` values (a channel of the batch for batch norm, a sample
for layer norm, a (sample, group) for group and instance norm) and then applies an affine map:

.. math::
    \hat x = (x - \mu)\,\text{invstd},\qquad \text{invstd} = (\sigma^2 + \epsilon)^{-1/2},\qquad
    y = \gamma \hat x + \beta .

Differentiating :math:`\mu` and :math:`\sigma^2` (:math:`\dot\mu = \overline{\dot x}`,
:math:`\dot{\sigma^2} = 2\,\overline{(x-\mu)\dot x}`) gives the derivative of standardization in one line,

.. math::
    P(u) = \text{invstd}\,\big(u - \overline{u} - \hat x\,\overline{\hat x u}\big),
    \qquad \frac{\partial \hat x}{\partial x} = \frac{\text{invstd}}{M}\big(M I - \mathbf 1\mathbf 1^\top
    - \hat x \hat x^\top\big),

(bars are means over the ``M`` values). The Jacobian is **symmetric**, so the same map :math:`P` is both the
forward-mode derivative (Jacobian-vector product, ``u`` = the input's tangent :math:`\dot x`) and the backward
(vector-Jacobian product, ``u = gamma * dy``): the hand-derived backward of batch norm *is* its forward-mode
derivative applied to ``gamma * dy``. With the affine map,

.. math::
    \dot y = \gamma\,P(\dot x) + \dot\gamma\,\hat x + \dot\beta,\qquad
    dx = P(\gamma\,dy),\quad d\gamma = \textstyle\sum dy\,\hat x,\quad d\beta = \sum dy .

RMS normalization has no centring: :math:`P(u) = \text{invrms}\,(u - \hat x\,\overline{\hat x u})`. In evaluation
batch norm uses constant running statistics, and :math:`P(u) = \text{invstd}\,u`.

The functions below compute these formulas with out-of-place torch operations only, recomputing the statistics
from ``x``: so autograd can differentiate them again (double backward: gradient penalties, Hessian-vector
products, MAML), ``torch.func`` can batch them (``vmap``, per-sample gradients) and forward-mode AD sees
through them. The autograd Functions of :mod:`bnlib.torch` use their fast hand-written paths for a plain
``backward()`` and these when :func:`higher_order` says the backward itself must be differentiable.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers

__all__ = ["higher_order", "transforms_active", "standardize", "project", "affine_tangent", "affine_grads",
           "apply", "compile_twin"]


def transforms_active() -> bool:
    """True inside a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ``jacrev``, ...)."""
    return torch._C._are_functorch_transforms_active()


def higher_order() -> bool:
    """True when a backward must be built from differentiable ops: ``create_graph=True`` (grad mode is on
    inside the backward) or a ``torch.func`` transform is running."""
    return torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()


def standardize(x: torch.Tensor, dims: Sequence[int], eps: float, center: bool = True):
    """``(xhat, invstd)`` over ``dims`` (keepdim), differentiable. ``center=False``: RMS normalization."""
    xmu = x - x.mean(dims, keepdim=True) if center else x
    invstd = torch.rsqrt((xmu * xmu).mean(dims, keepdim=True) + eps)
    return xmu * invstd, invstd


def project(u: torch.Tensor, xhat: torch.Tensor, invstd: torch.Tensor, dims: Sequence[int],
            center: bool = True) -> torch.Tensor:
    """:math:`P(u) = \\text{invstd}\\,(u - \\bar u - \\hat x\\,\\overline{\\hat x u})` over ``dims``: the
    Jacobian of standardization applied to ``u`` (it is symmetric, so this is also its transpose)."""
    out = u - xhat * (xhat * u).mean(dims, keepdim=True)
    if center:
        out = out - u.mean(dims, keepdim=True)
    return out * invstd


def affine_tangent(xhat_dot: Optional[torch.Tensor], xhat: torch.Tensor, weight: Optional[torch.Tensor],
                   weight_dot: Optional[torch.Tensor], bias_dot: Optional[torch.Tensor]) -> torch.Tensor:
    """``ydot = gamma * xhat_dot + gamma_dot * xhat + beta_dot`` (``weight``, the tangents: views that broadcast
    against ``xhat``; any of them may be None)."""
    if xhat_dot is None:
        out = torch.zeros_like(xhat)
    else:
        out = xhat_dot if weight is None else xhat_dot * weight
    if weight_dot is not None:
        out = out + weight_dot * xhat
    if bias_dot is not None:
        out = out + bias_dot
    return out


def affine_grads(dy: torch.Tensor, xhat: torch.Tensor, param_dims: Sequence[int], need_w: bool, need_b: bool):
    """``(dgamma, dbeta)`` = sums of ``dy * xhat`` and ``dy`` over ``param_dims`` (the dims the parameters are
    broadcast along; empty: the per-element products themselves), None where not needed."""
    dims = tuple(param_dims)

    def total(t):
        return t.sum(dims) if dims else t

    return (total(dy * xhat) if need_w else None), (total(dy) if need_b else None)


def cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else (t if t.dtype == dtype else t.to(dtype))



_Function = torch.autograd.Function


def compile_twin(function_class):
    """A subclass of a Function with a hand-written ``jvp``, without it: ``torch.compile`` (dynamo) refuses to
    trace a Function that defines ``jvp``, so :func:`apply` calls this twin (the same forward, ``setup_context``
    and backward) while compiling; dynamo does not trace forward-mode AD anyway."""
    return type(function_class.__name__ + "Compiled", (function_class,),
                {"jvp": staticmethod(_Function.jvp), "__doc__": function_class.__doc__})


def apply(function_class, compiled_class, *args):
    """``function_class.apply(*args)`` (all of ``forward``'s arguments given, no keywords). For a Function with
    ``setup_context``, torch's ``apply`` binds the arguments to ``forward``'s signature on every call
    (``inspect.signature``: 15-20 microseconds, as much as the rest of a small batch norm's forward); with no
    ``torch.func`` transform and no ``torch.compile`` tracing running, this calls the autograd engine's apply
    directly, as torch's own does after the binding. While compiling: ``compiled_class`` (its
    :func:`compile_twin`, a module-level name so that dynamo can follow it)."""
    if torch.compiler.is_compiling():
        return compiled_class.apply(*args)
    if torch._C._are_functorch_transforms_active():
        return function_class.apply(*args)
    return super(_Function, function_class).apply(*_unwrap_dead_wrappers(args))
