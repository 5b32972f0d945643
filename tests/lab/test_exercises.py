"""bnlib.lab.exercises: every checker accepts a correct solution and rejects realistic mistakes with the message
that names them; a stub that raises NotImplementedError gets the friendly verdict; the output is deterministic.

The correct solutions below are written the way a reader would write them (NumPy or torch, no bnlib), and each
mistake is one a reader makes (the chapters' exercises list them)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bnlib.numpy as bnp
from bnlib.lab import exercises as ex
from bnlib.lab.exercises._core import num


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _shape(x):
    return (1, -1) + (1,) * (x.ndim - 2)


# ---------------------------------------------------------------------------------------------------------
# Correct solutions
# ---------------------------------------------------------------------------------------------------------

def batch_stats(x):
    mean = x.mean(axis=_axes(x))
    var = ((x - x.mean(axis=_axes(x), keepdims=True)) ** 2).mean(axis=_axes(x))
    return mean, var


def standardize(x, eps=1e-5):
    mean = x.mean(axis=_axes(x), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=_axes(x), keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def identity_params(x, eps=1e-5):
    mean, var = batch_stats(x)
    return np.sqrt(var + eps), mean


def batch_norm_train(x, gamma, beta, eps=1e-5):
    return gamma.reshape(_shape(x)) * standardize(x, eps) + beta.reshape(_shape(x))


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if training:
        mean, var = batch_stats(x)
        n = x.size // x.shape[1]
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += momentum * var * n / (n - 1)
    else:
        mean, var = running_mean, running_var
    y = (x - mean.reshape(_shape(x))) / np.sqrt(var.reshape(_shape(x)) + eps)
    if weight is not None:
        y = y * weight.reshape(_shape(x))
    if bias is not None:
        y = y + bias.reshape(_shape(x))
    return y.astype(x.dtype)


def population_stats(batches):
    means, variances = zip(*(batch_stats(b) for b in batches))
    m = batches[0].size // batches[0].shape[1]
    return np.mean(means, axis=0), m / (m - 1) * np.mean(variances, axis=0)


def backward(dy, x, gamma, eps=1e-5):
    ax = _axes(x)
    mean = x.mean(axis=ax, keepdims=True)
    sigma = np.sqrt(((x - mean) ** 2).mean(axis=ax, keepdims=True) + eps)
    xhat = (x - mean) / sigma
    dx = gamma.reshape(_shape(x)) / sigma * (dy - dy.mean(axis=ax, keepdims=True)
                                             - xhat * (dy * xhat).mean(axis=ax, keepdims=True))
    return dx, (dy * xhat).sum(axis=ax), dy.sum(axis=ax)


def scaled_output_std(var, a, eps=1e-5):
    v = np.asarray(a) ** 2 * np.asarray(var)
    return np.sqrt(v / (v + eps))


def steps_to_target(eval_steps, eval_acc, target):
    for step, acc in zip(eval_steps, eval_acc):
        if acc >= target:
            return step
    return None


def ics_measure(G, G_after):
    a, b = G.ravel().astype(np.float64), G_after.ravel().astype(np.float64)
    return np.linalg.norm(a - b), a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def angular_update(w_old, w_new):
    a, b = w_old.ravel(), w_new.ravel()
    return float(np.arccos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0)))


def _channel_affine(y, weight, bias):
    shape = (1, y.shape[1]) + (1,) * (y.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    N = x.shape[0]
    y = bnp.batch_norm(x.reshape(1, N * num_groups, -1), None, None, training=True, eps=eps).reshape(x.shape)
    return _channel_affine(y, weight, bias)


def renorm_factors(x, running_mean, running_var, eps=1e-5, r_max=3.0, d_max=5.0):
    mean, var = batch_stats(x)
    sigma_b, sigma = np.sqrt(var + eps), np.sqrt(running_var + eps)
    return np.clip(sigma_b / sigma, 1 / r_max, r_max), np.clip((mean - running_mean) / sigma, -d_max, d_max)


def layer_norm(h, weight=None, bias=None, eps=1e-5):
    mean = h.mean(axis=-1, keepdims=True)
    y = (h - mean) / np.sqrt(((h - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def masked_stats(x, lengths):
    T = x.shape[1]
    mask = (np.asarray(lengths)[:, None] > np.arange(T))[:, :, None]
    count = mask.sum(axis=0)
    mean = (x * mask).sum(axis=0) / count
    return mean, (((x - mean) * mask) ** 2).sum(axis=0) / count


def fold_linear(W, b, gamma, beta, running_mean, running_var, eps=1e-5):
    scale = gamma / np.sqrt(running_var + eps)
    return W * scale[:, None], beta + ((0.0 if b is None else b) - running_mean) * scale


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def recalibrate(model, batches, *, reset=True, cumulative=True, train=True, restore=True):
    bns = _bns(model)
    was_training, momenta = model.training, [m.momentum for m in bns]
    for m in bns:
        if reset:
            m.reset_running_stats()
        if cumulative:
            m.momentum = None
    model.train(train)
    with torch.no_grad():
        for xb in batches:
            model(xb)
    if restore:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)


def fold_conv_bn(conv, bn, *, inplace=False, eps=True):
    folded = conv if inplace else copy.deepcopy(conv)
    if folded.bias is None:
        folded.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
    scale = gamma / torch.sqrt(bn.running_var + (bn.eps if eps else 0.0))
    with torch.no_grad():
        folded.weight.mul_(scale.reshape(-1, 1, 1, 1))
        folded.bias.copy_(beta + (folded.bias - bn.running_mean) * scale)
    return folded


def merge_stats(a, b):
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    if n == 0:
        return 0, ma.copy(), sa.copy()
    delta = mb - ma
    return n, ma + delta * nb / n, sa + sb + delta ** 2 * na * nb / n


# ---------------------------------------------------------------------------------------------------------
# Mistakes, one function each (named for what goes wrong)
# ---------------------------------------------------------------------------------------------------------

def stats_unbiased(x):
    return x.mean(axis=_axes(x)), x.var(axis=_axes(x), ddof=1)


def stats_axis0_only(x):
    return x.mean(axis=0), x.var(axis=0)


def stats_per_example(x):
    return x.mean(axis=1), x.var(axis=1)


def stats_naive(x):
    mean = x.mean(axis=_axes(x))
    return mean, (x * x).mean(axis=_axes(x)) - mean ** 2


def stats_std(x):
    return x.mean(axis=_axes(x)), x.std(axis=_axes(x))


def stats_in_place(x):
    x -= x.mean(axis=_axes(x), keepdims=True)
    return batch_stats(x)


def standardize_eps_outside(x, eps=1e-5):
    mean = x.mean(axis=_axes(x), keepdims=True)
    return (x - mean) / (x.std(axis=_axes(x), keepdims=True) + eps)


def standardize_no_eps(x, eps=1e-5):
    return (x - x.mean(axis=_axes(x), keepdims=True)) / x.std(axis=_axes(x), keepdims=True)


def standardize_fixed_eps(x, eps=1e-5):
    return standardize(x, 1e-5)


def standardize_unbiased(x, eps=1e-5):
    return (x - x.mean(axis=_axes(x), keepdims=True)) / np.sqrt(x.var(axis=_axes(x), ddof=1, keepdims=True) + eps)


def standardize_per_position(x, eps=1e-5):
    return (x - x.mean(axis=0, keepdims=True)) / np.sqrt(x.var(axis=0, keepdims=True) + eps)


def standardize_float64(x, eps=1e-5):
    return standardize(x.astype(np.float64), eps)


def identity_no_eps(x, eps=1e-5):
    mean, var = batch_stats(x)
    return np.sqrt(var), mean


def identity_swapped(x, eps=1e-5):
    gamma, beta = identity_params(x, eps)
    return beta, gamma


def identity_variance(x, eps=1e-5):
    mean, var = batch_stats(x)
    return var + eps, mean


def identity_minus_mean(x, eps=1e-5):
    gamma, beta = identity_params(x, eps)
    return gamma, -beta


def train_last_axis(x, gamma, beta, eps=1e-5):
    return gamma * standardize(x, eps) + beta


def train_swapped(x, gamma, beta, eps=1e-5):
    return batch_norm_train(x, beta, gamma, eps)


def train_beta_inside(x, gamma, beta, eps=1e-5):
    return gamma.reshape(_shape(x)) * (standardize(x, eps) + beta.reshape(_shape(x)))


def train_no_affine(x, gamma, beta, eps=1e-5):
    return standardize(x, eps)


def train_naive(x, gamma, beta, eps=1e-5):
    mean = x.mean(axis=_axes(x), keepdims=True)
    var = (x * x).mean(axis=_axes(x), keepdims=True) - mean ** 2
    y = (x - mean) / np.sqrt(np.maximum(var, 0) + eps)
    return gamma.reshape(_shape(x)) * y + beta.reshape(_shape(x))


def forward_biased_running_var(x, rm, rv, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if training:
        n = x.size // x.shape[1]
        rv_copy = rv.copy()
        y = batch_norm(x, rm, rv, weight, bias, training, momentum, eps)
        rv[:] = (1 - momentum) * rv_copy + momentum * (rv - (1 - momentum) * rv_copy) / momentum * (n - 1) / n
        return y
    return batch_norm(x, rm, rv, weight, bias, training, momentum, eps)


def forward_keras_momentum(x, rm, rv, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    return batch_norm(x, rm, rv, weight, bias, training, 1 - momentum, eps)


def forward_rebinds(x, rm, rv, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    rm, rv = rm.copy(), rv.copy()      # "running_mean = (1 - momentum) * running_mean + ..." inside the function
    return batch_norm(x, rm, rv, weight, bias, training, momentum, eps)


def forward_eval_batch_stats(x, rm, rv, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if training:
        return batch_norm(x, rm, rv, weight, bias, training, momentum, eps)
    return _channel_affine(standardize(x, eps), weight, bias).astype(x.dtype)


def forward_updates_in_eval(x, rm, rv, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    y = batch_norm(x, rm, rv, weight, bias, training, momentum, eps)
    if not training:
        batch_norm(x, rm, rv, None, None, True, momentum, eps)
    return y


def forward_bessel_n(x, rm, rv, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if not training:
        return batch_norm(x, rm, rv, weight, bias, training, momentum, eps)
    mean, var = batch_stats(x)
    N = x.shape[0]
    rm[:] = (1 - momentum) * rm + momentum * mean
    rv[:] = (1 - momentum) * rv + momentum * var * N / (N - 1)
    y = (x - mean.reshape(_shape(x))) / np.sqrt(var.reshape(_shape(x)) + eps)
    return _channel_affine(y, weight, bias).astype(x.dtype)


def forward_weight_required(x, rm, rv, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    y = batch_norm(x, rm, rv, None, None, training, momentum, eps)
    return (y * weight.reshape(_shape(x)) + bias.reshape(_shape(x))).astype(x.dtype)


def forward_returns_tuple(x, rm, rv, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    return batch_norm(x, rm, rv, weight, bias, training, momentum, eps), rm, rv


def population_biased(batches):
    means, variances = zip(*(batch_stats(b) for b in batches))
    return np.mean(means, axis=0), np.mean(variances, axis=0)


def population_pooled(batches):
    return batch_stats(np.concatenate(batches))


def population_var_of_means(batches):
    means = np.array([batch_stats(b)[0] for b in batches])
    return means.mean(axis=0), means.var(axis=0)


def population_factor_n(batches):
    means, variances = zip(*(batch_stats(b) for b in batches))
    N = len(batches[0])
    return np.mean(means, axis=0), N / (N - 1) * np.mean(variances, axis=0)


def _compact(dy, x, gamma, eps, *, mean_term=True, var_term=True, use_gamma=True, means=True, sigma_ddof=0):
    ax = _axes(x)
    mean = x.mean(axis=ax, keepdims=True)
    n = x.size // x.shape[1]
    sigma = np.sqrt(((x - mean) ** 2).sum(axis=ax, keepdims=True) / (n - sigma_ddof) + eps)
    xhat = (x - mean) / sigma
    red = (lambda a: a.mean(axis=ax, keepdims=True)) if means else (lambda a: a.sum(axis=ax, keepdims=True))
    dx = dy - (red(dy) if mean_term else 0) - (xhat * red(dy * xhat) if var_term else 0)
    dx = (gamma.reshape(_shape(x)) if use_gamma else 1) / sigma * dx
    return dx, (dy * xhat).sum(axis=ax), dy.sum(axis=ax)


def backward_no_mean_term(dy, x, gamma, eps=1e-5):
    return _compact(dy, x, gamma, eps, mean_term=False)


def backward_no_var_term(dy, x, gamma, eps=1e-5):
    return _compact(dy, x, gamma, eps, var_term=False)


def backward_eval_formula(dy, x, gamma, eps=1e-5):
    return _compact(dy, x, gamma, eps, mean_term=False, var_term=False)


def backward_no_gamma(dy, x, gamma, eps=1e-5):
    return _compact(dy, x, gamma, eps, use_gamma=False)


def backward_sums(dy, x, gamma, eps=1e-5):
    return _compact(dy, x, gamma, eps, means=False)


def backward_unbiased(dy, x, gamma, eps=1e-5):
    return _compact(dy, x, gamma, eps, sigma_ddof=1)


def backward_swapped_params(dy, x, gamma, eps=1e-5):
    dx, dg, db = backward(dy, x, gamma, eps)
    return dx, db, dg


def backward_dgamma_x(dy, x, gamma, eps=1e-5):
    dx, _, db = backward(dy, x, gamma, eps)
    return dx, (dy * x).sum(axis=_axes(x)), db


def backward_flat_reshape(dy, x, gamma, eps=1e-5):
    C = x.shape[1]
    dx, dg, db = backward(dy.reshape(-1, C), x.reshape(-1, C), gamma, eps)
    return dx.reshape(x.shape), dg, db


def std_no_eps(var, a, eps=1e-5):
    return np.ones(np.broadcast(np.asarray(var), np.asarray(a)).shape)


def std_a_not_squared(var, a, eps=1e-5):
    v = np.asarray(a) * np.asarray(var)
    return np.sqrt(v / (v + eps))


def std_variance(var, a, eps=1e-5):
    v = np.asarray(a) ** 2 * np.asarray(var)
    return v / (v + eps)


def steps_index(eval_steps, eval_acc, target):
    for i, acc in enumerate(eval_acc):
        if acc >= target:
            return i
    return None


def steps_strict(eval_steps, eval_acc, target):
    for step, acc in zip(eval_steps, eval_acc):
        if acc > target:
            return step
    return None


def steps_minus_one(eval_steps, eval_acc, target):
    result = steps_to_target(eval_steps, eval_acc, target)
    return -1 if result is None else result


def steps_last(eval_steps, eval_acc, target):
    last = None
    for step, acc in zip(eval_steps, eval_acc):
        if acc >= target and last is None:
            last = step
        elif acc < target:
            last = None
    return last


def ics_squared(G, G_after):
    l2, cos = ics_measure(G, G_after)
    return l2 ** 2, cos


def ics_spectral(G, G_after):
    _, cos = ics_measure(G, G_after)
    return np.linalg.norm(G - G_after, 2), cos


def ics_rows(G, G_after):
    a, b = torch.from_numpy(np.asarray(G)), torch.from_numpy(np.asarray(G_after))
    return torch.norm(a - b), torch.nn.functional.cosine_similarity(a, b)


def ics_dot(G, G_after):
    l2, _ = ics_measure(G, G_after)
    return l2, float((G * G_after).sum())


def angle_degrees(w_old, w_new):
    return float(np.degrees(angular_update(w_old, w_new)))


def angle_unclipped(w_old, w_new):
    a, b = w_old.ravel(), w_new.ravel()
    return float(np.arccos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))


def angle_cosine(w_old, w_new):
    a, b = w_old.ravel(), w_new.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def angle_not_flattened(w_old, w_new):
    c = np.dot(w_old, w_new) / (np.linalg.norm(w_old) * np.linalg.norm(w_new))
    return np.arccos(np.clip(c, -1, 1))


def gn_over_batch(x, num_groups, weight=None, bias=None, eps=1e-5):
    N = x.shape[0]
    y = bnp.batch_norm(x.reshape(N, num_groups, -1), None, None, training=True, eps=eps).reshape(x.shape)
    return _channel_affine(y, weight, bias)


def gn_rows(x, num_groups, weight=None, bias=None, eps=1e-5):
    N = x.shape[0]
    y = bnp.batch_norm(x.reshape(N * num_groups, -1), None, None, training=True, eps=eps).reshape(x.shape)
    return _channel_affine(y, weight, bias)


def gn_interleaved(x, num_groups, weight=None, bias=None, eps=1e-5):
    N, C = x.shape[:2]
    xr = np.moveaxis(x.reshape((N, C // num_groups, num_groups) + x.shape[2:]), 2, 1)
    y = bnp.batch_norm(np.ascontiguousarray(xr).reshape(1, N * num_groups, -1), None, None, training=True, eps=eps)
    y = np.moveaxis(y.reshape((N, num_groups, C // num_groups) + x.shape[2:]), 1, 2).reshape(x.shape)
    return _channel_affine(y, weight, bias)


def gn_affine_per_group(x, num_groups, weight=None, bias=None, eps=1e-5):
    N = x.shape[0]
    y = bnp.batch_norm(x.reshape(1, N * num_groups, -1), None, None, training=True, eps=eps).reshape(N, num_groups, -1)
    if weight is not None:
        y = y * weight[None, :, None] + bias[None, :, None]
    return y.reshape(x.shape)


def gn_no_affine(x, num_groups, weight=None, bias=None, eps=1e-5):
    return group_norm(x, num_groups, None, None, eps)


def renorm_inverted(x, rm, rv, eps=1e-5, r_max=3.0, d_max=5.0):
    r, d = renorm_factors(x, rm, rv, eps, r_max, d_max)
    mean, var = batch_stats(x)
    return np.clip(np.sqrt(rv + eps) / np.sqrt(var + eps), 1 / r_max, r_max), d


def renorm_unclipped(x, rm, rv, eps=1e-5, r_max=3.0, d_max=5.0):
    mean, var = batch_stats(x)
    sigma = np.sqrt(rv + eps)
    return np.sqrt(var + eps) / sigma, (mean - rm) / sigma


def renorm_clip_zero(x, rm, rv, eps=1e-5, r_max=3.0, d_max=5.0):
    mean, var = batch_stats(x)
    sigma = np.sqrt(rv + eps)
    return np.clip(np.sqrt(var + eps) / sigma, 0, r_max), np.clip((mean - rm) / sigma, -d_max, d_max)


def renorm_d_raw(x, rm, rv, eps=1e-5, r_max=3.0, d_max=5.0):
    r, _ = renorm_factors(x, rm, rv, eps, r_max, d_max)
    return r, np.clip(batch_stats(x)[0] - rm, -d_max, d_max)


def renorm_d_batch_sigma(x, rm, rv, eps=1e-5, r_max=3.0, d_max=5.0):
    r, _ = renorm_factors(x, rm, rv, eps, r_max, d_max)
    mean, var = batch_stats(x)
    return r, np.clip((mean - rm) / np.sqrt(var + eps), -d_max, d_max)


def ln_over_batch(h, weight=None, bias=None, eps=1e-5):
    y = (h - h.mean(axis=0)) / np.sqrt(h.var(axis=0) + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def ln_no_keepdims(h, weight=None, bias=None, eps=1e-5):
    y = (h - h.mean(axis=-1)) / np.sqrt(h.var(axis=-1) + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def ln_unbiased(h, weight=None, bias=None, eps=1e-5):
    y = (h - h.mean(axis=-1, keepdims=True)) / np.sqrt(h.var(axis=-1, ddof=1, keepdims=True) + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def ln_std_plus_eps(h, weight=None, bias=None, eps=1e-5):
    y = (h - h.mean(axis=-1, keepdims=True)) / (h.std(axis=-1, keepdims=True) + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def masked_with_padding(x, lengths):
    return x.mean(axis=0), x.var(axis=0)


def masked_off_by_one(x, lengths):
    T = x.shape[1]
    mask = (np.asarray(lengths)[:, None] >= np.arange(T))[:, :, None]
    count = mask.sum(axis=0)
    mean = (x * mask).sum(axis=0) / count
    return mean, (((x - mean) * mask) ** 2).sum(axis=0) / count


def masked_divide_by_n(x, lengths):
    T = x.shape[1]
    mask = (np.asarray(lengths)[:, None] > np.arange(T))[:, :, None]
    mean = (x * mask).sum(axis=0) / len(x)
    return mean, (((x - mean) * mask) ** 2).sum(axis=0) / len(x)


def masked_unbiased(x, lengths):
    T = x.shape[1]
    mask = (np.asarray(lengths)[:, None] > np.arange(T))[:, :, None]
    count = mask.sum(axis=0)
    mean = (x * mask).sum(axis=0) / count
    return mean, (((x - mean) * mask) ** 2).sum(axis=0) / (count - 1)


def fold_linear_columns(W, b, gamma, beta, running_mean, running_var, eps=1e-5):
    scale = gamma / np.sqrt(running_var + eps)
    return W * scale, beta + ((0.0 if b is None else b) - running_mean) * scale


def fold_linear_no_mean(W, b, gamma, beta, running_mean, running_var, eps=1e-5):
    scale = gamma / np.sqrt(running_var + eps)
    return W * scale[:, None], beta + (0.0 if b is None else b) * scale


def fold_linear_no_eps(W, b, gamma, beta, running_mean, running_var, eps=1e-5):
    scale = gamma / np.sqrt(running_var)
    return W * scale[:, None], beta + ((0.0 if b is None else b) - running_mean) * scale


def fold_linear_bias_required(W, b, gamma, beta, running_mean, running_var, eps=1e-5):
    scale = gamma / np.sqrt(running_var + eps)
    return W * scale[:, None], beta + (b - running_mean) * scale


def fold_conv_fresh_conv(conv, bn):
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, groups=conv.groups).to(conv.weight.dtype)
    ref = fold_conv_bn(conv, bn)
    with torch.no_grad():
        folded.weight.copy_(ref.weight)
        folded.bias.copy_(ref.bias)
    return folded


def fold_conv_input_axis(conv, bn):
    folded = copy.deepcopy(conv)
    if folded.bias is None:
        folded.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        folded.weight.mul_(scale.reshape(1, -1, 1, 1))
        folded.bias.copy_(bn.bias + (folded.bias - bn.running_mean) * scale)
    return folded


def fold_conv_conv_bias_assumed(conv, bn):
    folded = copy.deepcopy(conv)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        folded.weight.mul_(scale.reshape(-1, 1, 1, 1))
        folded.bias.copy_(bn.bias + (conv.bias - bn.running_mean) * scale)
    return folded


def merge_plain_average(a, b):
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    return n, (ma + mb) / 2, sa + sb + (mb - ma) ** 2 * na * nb / n


def merge_no_between_term(a, b):
    n, mean, _ = merge_stats(a, b)
    return n, mean, a[2] + b[2]


def merge_between_term_not_divided(a, b):
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    return n, ma + (mb - ma) * nb / n, sa + sb + (mb - ma) ** 2 * na * nb


def merge_unguarded(a, b):
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    delta = mb - ma
    return n, (na * ma + nb * mb) / n, sa + sb + delta ** 2 * na * nb / n if na and nb else sa + sb + delta * np.nan


def merge_returns_variance(a, b):
    n, mean, M2 = merge_stats(a, b)
    return n, mean, M2 / n


# ---------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------

CORRECT = [
    (ex.check_batch_stats, batch_stats, {}),
    (ex.check_standardize, standardize, {}),
    (ex.check_identity_params, identity_params, {}),
    (ex.check_batch_norm_train, batch_norm_train, {}),
    (ex.check_batch_norm_forward, batch_norm, {}),
    (ex.check_population_stats, population_stats, {}),
    (ex.check_batch_norm_backward, backward, {}),
    (ex.check_batch_norm_backward, backward, {"spatial": True}),
    (ex.check_scaled_output_std, scaled_output_std, {}),
    (ex.check_steps_to_target, steps_to_target, {}),
    (ex.check_ics_measure, ics_measure, {}),
    (ex.check_angular_update, angular_update, {}),
    (ex.check_group_norm, group_norm, {}),
    (ex.check_renorm_factors, renorm_factors, {}),
    (ex.check_layer_norm, layer_norm, {}),
    (ex.check_masked_stats, masked_stats, {}),
    (ex.check_fold_linear, fold_linear, {}),
    (ex.check_recalibrate, recalibrate, {}),
    (ex.check_fold_conv_bn, fold_conv_bn, {}),
    (ex.check_merge_stats, merge_stats, {}),
]


def _id(item):
    checker, fn, kwargs = item[:3]
    return f"{checker.__name__}-{fn.__name__}" + ("-spatial" if kwargs.get("spatial") else "")


@pytest.mark.parametrize("item", CORRECT, ids=_id)
def test_checker_accepts_the_correct_solution(item, capsys):
    checker, fn, kwargs = item
    result = checker(fn, **kwargs)
    printed = capsys.readouterr().out
    assert result.passed, printed
    assert printed.startswith(f"✓ {fn.__name__} passes all {len(result.passed_labels)} checks:")
    assert all(line.startswith("  ✓ ") for line in printed.splitlines()[1:])


def test_every_checker_is_exported_and_tested():
    checkers = {name for name in ex.__all__ if name.startswith("check_")}
    assert checkers == {c.__name__ for c, _, _ in CORRECT}
    assert checkers <= {item[0].__name__ for item in MISTAKES}


MISTAKES = [
    # chapter 1
    (ex.check_batch_stats, stats_unbiased, {}, ["UNBIASED", "divides by m = 7"]),
    (ex.check_batch_stats, stats_axis0_only, {}, ["shape (2, 4, 5)", "pool the batch and the spatial axes"]),
    (ex.check_batch_stats, stats_per_example, {}, ["one value per example", "axis 0"]),
    (ex.check_batch_stats, stats_naive, {}, ["mean 1e4", "cancels catastrophically"]),
    (ex.check_batch_stats, stats_std, {}, ["standard deviation"]),
    (ex.check_batch_stats, stats_in_place, {}, ["changed its input x in place"]),
    (ex.check_standardize, standardize_eps_outside, {}, ["INSIDE the square root"]),
    (ex.check_standardize, standardize_no_eps, {}, ["you left out eps", "sqrt(var + eps)", "0/0"]),
    (ex.check_standardize, standardize_fixed_eps, {}, ["ignores its eps argument"]),
    (ex.check_standardize, standardize_unbiased, {}, ["UNBIASED"]),
    (ex.check_standardize, standardize_per_position, {}, ["every position"]),
    (ex.check_standardize, standardize_float64, {}, ["float64 for a float32 input"]),
    # chapter 2
    (ex.check_identity_params, identity_no_eps, {}, ["leaves out eps"]),
    (ex.check_identity_params, identity_swapped, {}, ["swapped"]),
    (ex.check_identity_params, identity_variance, {}, ["is the variance"]),
    (ex.check_identity_params, identity_minus_mean, {}, ["wrong sign"]),
    (ex.check_batch_norm_train, train_last_axis, {}, ["LAST axis", "(1, C, 1, 1)"]),
    (ex.check_batch_norm_train, train_swapped, {}, ["swapped gamma and beta"]),
    (ex.check_batch_norm_train, train_beta_inside, {}, ["added beta before scaling"]),
    (ex.check_batch_norm_train, train_no_affine, {}, ["apply the scale and shift"]),
    (ex.check_batch_norm_train, train_naive, {}, ["mean 1e4", "E[x^2] - E[x]^2"]),
    # chapter 3
    (ex.check_batch_norm_backward, backward_no_mean_term, {}, ["your dx sums to", "should sum to 0",
                                                              "the mean term of the backward"]),
    (ex.check_batch_norm_backward, backward_no_var_term, {}, ["not orthogonal to xhat", "the variance term"]),
    (ex.check_batch_norm_backward, backward_eval_formula, {}, ["held constant (inference mode)"]),
    (ex.check_batch_norm_backward, backward_no_gamma, {}, ["missing the factor gamma"]),
    (ex.check_batch_norm_backward, backward_sums, {}, ["their MEANS"]),
    (ex.check_batch_norm_backward, backward_unbiased, {}, ["unbiased variance"]),
    (ex.check_batch_norm_backward, backward_swapped_params, {}, ["dgamma and dbeta are swapped"]),
    (ex.check_batch_norm_backward, backward_dgamma_x, {}, ["dgamma uses x"]),
    (ex.check_batch_norm_backward, backward_flat_reshape, {"spatial": True}, ["mixes channels"]),
    # chapter 4
    (ex.check_scaled_output_std, std_no_eps, {}, ["1 for every scale"]),
    (ex.check_scaled_output_std, std_a_not_squared, {}, ["enters the variance squared"]),
    (ex.check_scaled_output_std, std_variance, {}, ["VARIANCE of the output"]),
    (ex.check_steps_to_target, steps_index, {}, ["POSITION in the list", "eval_steps[3] = 300"]),
    (ex.check_steps_to_target, steps_strict, {}, ["(>=, not >)"]),
    (ex.check_steps_to_target, steps_minus_one, {}, ["never reached", "return None"]),
    (ex.check_steps_to_target, steps_last, {}, ["the FIRST step"]),
    # chapter 5
    (ex.check_ics_measure, ics_squared, {}, ["SQUARED distance"]),
    (ex.check_ics_measure, ics_spectral, {}, ["largest singular value", "Frobenius"]),
    (ex.check_ics_measure, ics_rows, {}, ["one value per row", "flatten"]),
    (ex.check_ics_measure, ics_dot, {}, ["dot product"]),
    (ex.check_angular_update, angle_degrees, {}, ["DEGREES"]),
    (ex.check_angular_update, angle_unclipped, {}, ["NaN", "clip the cosine to [-1, 1]"]),
    (ex.check_angular_update, angle_cosine, {}, ["that is the cosine"]),
    (ex.check_angular_update, angle_not_flattened, {}, ["flatten both weights"]),
    # chapter 6
    (ex.check_group_norm, gn_over_batch, {}, ["depends on the other examples", "(1, N * G, -1)"]),
    (ex.check_group_norm, gn_rows, {}, ["normalizes each COLUMN"]),
    (ex.check_group_norm, gn_interleaved, {}, ["interleave the channels"]),
    (ex.check_group_norm, gn_affine_per_group, {}, ["one entry per CHANNEL"]),
    (ex.check_group_norm, gn_no_affine, {}, ["no scale and shift"]),
    (ex.check_renorm_factors, renorm_inverted, {}, ["upside down"]),
    (ex.check_renorm_factors, renorm_unclipped, {}, ["r is not clipped"]),
    (ex.check_renorm_factors, renorm_clip_zero, {}, ["[0, r_max]", "1/r_max"]),
    (ex.check_renorm_factors, renorm_d_raw, {}, ["not divided by sigma"]),
    (ex.check_renorm_factors, renorm_d_batch_sigma, {}, ["BATCH's sigma_B"]),
    # chapter 7
    (ex.check_batch_norm_forward, forward_biased_running_var, {},
     ["running_var holds the biased variance; PyTorch stores the unbiased one"]),
    (ex.check_batch_norm_forward, forward_keras_momentum, {}, ["OLD average", "Keras"]),
    (ex.check_batch_norm_forward, forward_rebinds, {}, ["unchanged after a training-mode call", "IN PLACE"]),
    (ex.check_batch_norm_forward, forward_eval_batch_stats, {}, ["in eval mode (training=False) normalize with "
                                                                 "running_mean and running_var"]),
    (ex.check_batch_norm_forward, forward_updates_in_eval, {}, ["changed in eval mode"]),
    (ex.check_batch_norm_forward, forward_bessel_n, {}, ["counts the N = 2 examples", "n = N * H * W = 40"]),
    (ex.check_batch_norm_forward, forward_weight_required, {}, ["NoneType", "weight=None as 1"]),
    (ex.check_batch_norm_forward, forward_returns_tuple, {}, ["returned a tuple"]),
    (ex.check_population_stats, population_biased, {}, ["BIASED batch variances", "m / (m - 1)"]),
    (ex.check_population_stats, population_pooled, {}, ["pooled all values"]),
    (ex.check_population_stats, population_var_of_means, {}, ["batch MEANS"]),
    (ex.check_population_stats, population_factor_n, {}, ["counts the N = 2 examples"]),
    (ex.check_recalibrate, lambda m, b: recalibrate(m, b, train=False), {}, ["reset values", "TRAINING mode"]),
    (ex.check_recalibrate, lambda m, b: recalibrate(m, b, reset=False, cumulative=False), {},
     ["exponential moving average", "reset_running_stats"]),
    (ex.check_recalibrate, lambda m, b: recalibrate(m, b, cumulative=False), {}, ["kept the momentum"]),
    (ex.check_recalibrate, lambda m, b: recalibrate(m, b, reset=False), {}, ["without resetting"]),
    (ex.check_recalibrate, lambda m, b: recalibrate(m, b, restore=False), {}, ["left the model in training mode"]),
    # chapter 8
    (ex.check_layer_norm, ln_over_batch, {}, ["depends on the other examples", "axis=-1"]),
    (ex.check_layer_norm, ln_no_keepdims, {}, ["keepdims=True"]),
    (ex.check_layer_norm, ln_unbiased, {}, ["unbiased variance"]),
    (ex.check_layer_norm, ln_std_plus_eps, {}, ["eps goes inside the square root"]),
    (ex.check_masked_stats, masked_with_padding, {}, ["includes the padding", "only 4 of 5 sequences"]),
    (ex.check_masked_stats, masked_off_by_one, {}, ["off by one"]),
    (ex.check_masked_stats, masked_divide_by_n, {}, ["dividing the valid values' sum by N = 5", "only 4 of 5"]),
    (ex.check_masked_stats, masked_unbiased, {}, ["unbiased"]),
    (ex.check_fold_linear, fold_linear_columns, {}, ["scale[:, None]"]),
    (ex.check_fold_linear, fold_linear_no_mean, {}, ["forgets the running mean"]),
    (ex.check_fold_linear, fold_linear_no_eps, {}, ["left out eps"]),
    (ex.check_fold_linear, fold_linear_bias_required, {}, ["b is None"]),
    # chapter 9
    (ex.check_fold_conv_bn, lambda conv, bn: fold_conv_bn(conv, bn, inplace=True), {}, ["changed the original layers"]),
    (ex.check_fold_conv_bn, fold_conv_fresh_conv, {}, ["copy stride, padding, dilation and groups"]),
    (ex.check_fold_conv_bn, fold_conv_input_axis, {}, ["one entry per OUTPUT channel", "scale.reshape(-1, 1, 1, 1)"]),
    (ex.check_fold_conv_bn, lambda conv, bn: fold_conv_bn(conv, bn, eps=False), {}, ["left out eps"]),
    (ex.check_fold_conv_bn, fold_conv_conv_bias_assumed, {}, ["NoneType", "conv.bias is None"]),
    (ex.check_merge_stats, merge_plain_average, {}, ["averaged the two means", "weight them by their counts"]),
    (ex.check_merge_stats, merge_no_between_term, {}, ["misses the spread BETWEEN the ranks"]),
    (ex.check_merge_stats, merge_between_term_not_divided, {}, ["forgot to divide by n"]),
    (ex.check_merge_stats, merge_unguarded, {}, ["empty rank (count 0)", "guard the division"]),
    (ex.check_merge_stats, merge_returns_variance, {}, ["that is the variance"]),
]


def _mistake_id(item):
    checker, fn = item[:2]
    name = fn.__name__ if fn.__name__ != "<lambda>" else "lambda"
    return f"{checker.__name__}-{name}-{item[3][0][:24]}"


@pytest.mark.parametrize("item", MISTAKES, ids=_mistake_id)
def test_checker_names_the_mistake(item):
    checker, fn, kwargs, fragments = item
    result = checker(fn, quiet=True, **kwargs)
    assert result.status == "failed", str(result)
    for fragment in fragments:
        assert fragment in result.message, f"{fragment!r} not in the verdict:\n{result}"
    text = str(result)
    assert text.startswith("✗ ") and "Traceback" not in text
    assert "wrong" not in text.lower().split("\n")[0]  # the first line says which check, the message says why


def test_each_checker_rejects_at_least_three_mistakes():
    counts = {}
    for checker, _, _, _ in MISTAKES:
        counts[checker.__name__] = counts.get(checker.__name__, 0) + 1
    assert all(n >= 3 for n in counts.values()), counts


def test_a_stub_gets_the_friendly_not_implemented_verdict(capsys):
    def my_batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        raise NotImplementedError  # the reader's code goes here

    result = ex.check_batch_norm_forward(my_batch_norm)
    printed = capsys.readouterr()
    assert result.status == "not implemented" and not result.passed
    assert printed.out == ("… my_batch_norm is not implemented yet (its body still raises NotImplementedError): "
                           "write it, then run this cell again.\n")
    assert printed.err == ""


@pytest.mark.parametrize("item", CORRECT, ids=_id)
def test_every_checker_catches_not_implemented(item):
    checker, _, kwargs = item

    def stub(*args, **kw):
        raise NotImplementedError("fill me in")

    assert checker(stub, quiet=True, **kwargs).status == "not implemented"


def test_an_exception_is_reported_without_a_traceback():
    def broken(x):
        raise ValueError("something odd")

    result = ex.check_batch_stats(broken, quiet=True)
    assert result.status == "failed"
    assert result.message == "your function raised ValueError: something odd"


def test_no_return_and_wrong_arguments_are_explained():
    assert "forget `return mean, var`" in ex.check_batch_stats(lambda x: None, quiet=True).message
    assert "return 2 things" in ex.check_batch_stats(lambda x: x.mean(0), quiet=True).message
    not_called = ex.check_batch_stats(batch_stats(np.ones((2, 2))), quiet=True)
    assert "pass the function itself" in not_called.message


def test_verdict_is_deterministic_and_seed_independent_when_passing():
    first = str(ex.check_batch_norm_forward(batch_norm, quiet=True))
    assert str(ex.check_batch_norm_forward(batch_norm, quiet=True)) == first
    assert str(ex.check_batch_norm_forward(batch_norm, seed=3, quiet=True)) == first


def test_failing_verdict_lists_what_passed_and_what_did_not_run():
    result = ex.check_batch_stats(stats_naive, quiet=True)
    lines = result.lines()
    assert lines[0].startswith("✗ stats_naive fails check 7 of 7: float32 with mean 1e4")
    assert lines[-1].startswith("  (✓ passed before it: (N, C) = (7, 3), float64;")
    result = ex.check_batch_stats(stats_unbiased, quiet=True)
    assert result.lines()[-1] == "  (the other 6 checks run once this one passes)"


def test_result_does_not_display_twice_in_jupyter():
    result = ex.check_batch_stats(batch_stats, quiet=True)
    assert result._ipython_display_() is None
    assert repr(result) == "Result('batch_stats', 'passed')"


def test_numbers_in_messages_have_two_significant_digits():
    assert [num(v) for v in (0.3141, 1234.5, 2.5e-7, -0.0312, 0.0, 12.0)] == ["0.31", "1234", "2.5e-07", "-0.031",
                                                                              "0", "12"]


def test_reveal_shows_the_result_and_compares_the_prediction(capsys):
    shown = ex.reveal(None, np.array([[-1.0000001], [0.9999999]]))
    assert not shown and shown._ipython_display_() is None
    out = capsys.readouterr().out
    assert out == ("result: [[-1.00],\n [ 1.00]]\nyour prediction: none yet (write it into `prediction` above, then "
                   "run the cell again)\n")
    assert ex.reveal([[-1], [1]], np.array([[-0.999], [1.001]]), quiet=True)
    assert not ex.reveal([[-1], [1]], np.array([[-0.3], [0.3]]), quiet=True)
    assert ex.reveal(0.3, 0.30151, quiet=True)
    assert ex.reveal("Diverges", "diverges", quiet=True)
    assert ex.reveal({"BN": 30.0, "no BN": 3.0}, {"BN": 30, "no BN": 3}, quiet=True)
    assert not ex.reveal({"BN": 30.0}, {"BN": 30, "no BN": 3}, quiet=True)
    assert not ex.reveal(True, 1.0, quiet=True)
    ex.reveal(1, -0.0001)
    assert capsys.readouterr().out.startswith("result: 0.00\n✗ your prediction 1.00 differs")
    ex.reveal({"a": 1.0, "b": 2}, {"a": np.array([1.0, -0.0]), "b": 2.004})
    assert capsys.readouterr().out == ("result:\n  a: [1.00, 0.00]\n  b: 2.00\n✗ your prediction a: 1.00; b: 2.00 "
                                       "differs from the result: the answer below explains why\n")


# ---------------------------------------------------------------------------------------------------------
# The chapters' exercise sections follow one pattern (CONTRIBUTING.md, "Exercises")
# ---------------------------------------------------------------------------------------------------------

CHAPTERS = sorted((Path(__file__).resolve().parents[2] / "chapters").glob("[0-9][0-9]_*.ipynb"))


def _exercise_cells(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = nb["cells"]
    starts = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and "".join(c["source"]).startswith(
        "## Exercises")]
    assert len(starts) == 1, f"{path.name}: expected one '## Exercises' section, found {len(starts)}"
    assert not any(c["cell_type"] == "markdown" and "".join(c["source"]).startswith("## ")
                   for c in cells[starts[0] + 1:]), f"{path.name}: the Exercises section must be the last one"
    return [dict(c, source="".join(c["source"])) for c in cells[starts[0]:]]


def _text(cell):
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_ends_with_exercises_in_the_house_pattern(path):
    cells = _exercise_cells(path)
    titles = [c["source"].splitlines()[0] for c in cells if c["cell_type"] == "markdown"
              and c["source"].startswith("### Exercise ")]
    assert 3 <= len(titles) <= 6, f"{path.name}: {len(titles)} exercises"
    assert all(any(s in t for s in ("★ ", "★★ ", "★★★ ")) for t in titles), titles
    kinds = {t.rsplit("(", 1)[-1].rstrip(")") for t in titles}
    assert kinds <= {"implement", "predict, then run", "explain"} and "implement" in kinds, kinds
    code = [c for c in cells if c["cell_type"] == "code"]
    for i, cell in enumerate(code):
        tags = cell["metadata"].get("tags", [])
        assert cell["outputs"] and all(o["output_type"] != "error" for o in cell["outputs"]), cell["source"][:80]
        assert "Traceback" not in _text(cell)
        if "raise NotImplementedError" in cell["source"] and "@title Solution" not in cell["source"]:
            # the cell the reader edits: it runs cleanly and says "not implemented yet"; the solution follows
            assert "not implemented yet" in _text(cell), cell["source"][:80]
            solution = code[i + 1]
            assert solution["source"].startswith("# @title Solution")
            checker = cell["source"].strip().splitlines()[-1]
            assert checker.startswith("exercises.check_") and solution["source"].strip().endswith(checker)
        elif cell["source"].startswith("# @title Solution"):
            assert tags == ["hide-input"] and cell["metadata"]["jupyter"] == {"source_hidden": True}
            assert _text(cell).startswith("✓ ") and " passes all " in _text(cell)
        else:
            assert tags == ["hide-output"] and "prediction = None" in cell["source"], cell["source"][:80]
            assert "exercises.reveal(prediction" in cell["source"] and "\nresult:" in "\n" + _text(cell)
            assert "your prediction: none yet" in _text(cell)
    answers = [c for c in cells if c["cell_type"] == "markdown" and c["source"].startswith("<details>")]
    assert len(answers) == sum(t.endswith(("(predict, then run)", "(explain)")) for t in titles)
    assert all("<summary><b>Answer</b></summary>\n\n" in a["source"] and a["source"].endswith("\n\n</details>")
               for a in answers)


# ---------------------------------------------------------------------------------------------------------
# Chapter 11: freezing batch norm for fine-tuning (Keras' trainable = False)
# ---------------------------------------------------------------------------------------------------------

def freeze_bn(model, *, eval_bn=True, freeze_affine=True, kinds=(nn.modules.batchnorm._BatchNorm,),
              whole_model_eval=False, freeze_all=False, reset=False):
    model.train()
    if whole_model_eval:
        model.eval()
    if freeze_all:
        for p in model.parameters():
            p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, kinds):
            if eval_bn:
                m.eval()
            if reset:
                m.reset_running_stats()
            if freeze_affine:
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.requires_grad_(False)


def freeze_bn_affine_only(model):             # PyTorch's requires_grad = False alone: 'frozen_affine'
    freeze_bn(model, eval_bn=False)


def freeze_bn_eval_only(model):               # bn.eval() alone: 'frozen_stats'
    freeze_bn(model, freeze_affine=False)


def freeze_bn_2d_only(model):                 # isinstance(m, nn.BatchNorm2d) misses the BatchNorm1d layers
    freeze_bn(model, kinds=(nn.BatchNorm2d,))


def freeze_bn_model_eval(model):              # model.eval() switches off Dropout too
    freeze_bn(model, whole_model_eval=True)


def freeze_bn_everything(model):
    freeze_bn(model, freeze_all=True)


def freeze_bn_reset(model):
    freeze_bn(model, reset=True)


def freeze_bn_no_train(model):                # forgets model.train() when the model comes in eval mode
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(False)


def freeze_bn_affine_none(model):             # crashes on affine=False layers
    model.train()
    for m in _bns(model):
        m.eval()
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)


def freeze_bn_copy(model):
    model = copy.deepcopy(model)
    freeze_bn(model)
    return model


CORRECT.append((ex.check_freeze_bn, freeze_bn, {}))
FREEZE_MISTAKES = [
    (ex.check_freeze_bn, freeze_bn_affine_only, {}, ["still in TRAINING mode", "requires_grad = False only stops "
                                                     "the optimizer", "bn.eval()"]),
    (ex.check_freeze_bn, freeze_bn_eval_only, {}, ["requires_grad = True", "'frozen_stats'"]),
    (ex.check_freeze_bn, freeze_bn_2d_only, {}, ["(BatchNorm1d) is still in training mode", "_BatchNorm"]),
    (ex.check_freeze_bn, freeze_bn_model_eval, {}, ["module 3 (Dropout) is in eval mode", "model.eval()"]),
    (ex.check_freeze_bn, freeze_bn_everything, {}, ["every parameter of the model is frozen"]),
    (ex.check_freeze_bn, freeze_bn_reset, {}, ["running statistics changed"]),
    (ex.check_freeze_bn, freeze_bn_no_train, {}, ["came in eval mode: call model.train() first"]),
    (ex.check_freeze_bn, freeze_bn_affine_none, {}, ["raised AttributeError", "affine=False"]),
    (ex.check_freeze_bn, freeze_bn_copy, {}, ["returned another model"]),
]
MISTAKES.extend(FREEZE_MISTAKES)


def test_freeze_bn_checker_accepts_returning_the_model():
    # (CORRECT and MISTAKES are parametrized at collection, so the appended items run in the tests above)
    assert ex.check_freeze_bn(lambda m: freeze_bn(m) or m, quiet=True).passed


def test_freeze_bn_checker_catches_not_implemented(capsys):
    def freeze_bn(model):
        raise NotImplementedError  # your code here

    assert ex.check_freeze_bn(freeze_bn).status == "not implemented"
    assert "not implemented yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Chapter 10: RMS norm over the last axis
# ---------------------------------------------------------------------------------------------------------

def rms_norm(x, weight=None, eps=1e-6):
    y = x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def rms_norm_torch(x, weight=None, eps=1e-6):      # the same in torch: a tensor out is accepted
    t = torch.from_numpy(np.ascontiguousarray(x))
    w = None if weight is None else torch.from_numpy(weight)
    return torch.nn.functional.rms_norm(t, (t.shape[-1],), w, eps)


def rms_centred(x, weight=None, eps=1e-6):        # subtracts the mean: layer norm without bias
    xc = x - x.mean(axis=-1, keepdims=True)
    return rms_norm(xc, weight, eps)


def rms_eps_outside(x, weight=None, eps=1e-6):
    y = x / (np.sqrt((x ** 2).mean(axis=-1, keepdims=True)) + eps)
    return y if weight is None else y * weight


def rms_over_batch(x, weight=None, eps=1e-6):
    y = x / np.sqrt((x ** 2).mean(axis=0, keepdims=True) + eps)
    return y if weight is None else y * weight


def rms_no_weight(x, weight=None, eps=1e-6):
    return rms_norm(x, None, eps)


def rms_no_sqrt(x, weight=None, eps=1e-6):
    y = x / ((x ** 2).mean(axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def rms_fixed_eps(x, weight=None, eps=1e-6):
    return rms_norm(x, weight, 1e-5)


def rms_no_keepdims(x, weight=None, eps=1e-6):
    y = x / np.sqrt((x ** 2).mean(axis=-1) + eps)
    return y if weight is None else y * weight


CORRECT.append((ex.check_rms_norm, rms_norm, {}))
RMS_MISTAKES = [
    (ex.check_rms_norm, rms_centred, {}, ["you subtracted the mean: that is layer norm"]),
    (ex.check_rms_norm, rms_eps_outside, {}, ["eps goes inside the square root"]),
    (ex.check_rms_norm, rms_over_batch, {}, ["depends on the other examples", "axis=-1"]),
    (ex.check_rms_norm, rms_no_weight, {}, ["your output has no scale"]),
    (ex.check_rms_norm, rms_no_sqrt, {}, ["the mean SQUARE"]),
    (ex.check_rms_norm, rms_fixed_eps, {}, ["ignores its eps argument"]),
    (ex.check_rms_norm, rms_no_keepdims, {}, ["keepdims=True"]),
]
MISTAKES.extend(RMS_MISTAKES)


def test_rms_norm_checker_accepts_torch():
    assert ex.check_rms_norm(rms_norm_torch, quiet=True).passed
