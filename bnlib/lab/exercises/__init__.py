"""bnlib.lab.exercises: the checkers behind the exercises that close every chapter.

Each ``check_*`` function takes the reader's function, runs it on inputs the reader has not seen (odd sizes,
non-contiguous views, float32 with a large offset, batches of 1 or 2, training and eval mode), compares the
result with bnlib's reference (:mod:`bnlib.numpy`, finite differences where gradients are involved) and prints
a verdict: ``✓`` lines when everything passes, otherwise the first failing check with what is wrong and the
likely mistake ("running_var holds the biased variance; PyTorch stores the unbiased one ..."). A function whose
body still raises ``NotImplementedError`` gets a friendly "not implemented yet" line instead of a traceback,
so an exercise's stub cell runs cleanly (under nbval too). Each checker returns a :class:`Result`
(``.passed``, ``.status``, ``.message``) and accepts ``quiet=True`` to print nothing.

==========  ======================================  ====================================================
chapter     checker                                 the reader implements
==========  ======================================  ====================================================
1           :func:`check_batch_stats`               ``(mean, var)`` per channel (equations (1)-(2))
1           :func:`check_standardize`               equation (3), training mode
2           :func:`check_identity_params`           the ``(gamma, beta)`` that make batch norm the identity
2           :func:`check_batch_norm_train`          equations (1)-(4) for ``(N, C)`` and ``(N, C, H, W)``
3           :func:`check_batch_norm_backward`       the backward in the compact form (``spatial=True``: 4-D)
4           :func:`check_scaled_output_std`         what eps does to the scale invariance
4           :func:`check_steps_to_target`           "steps to 90 %", the chapter's speed measure
5           :func:`check_ics_measure`               Santurkar et al.'s internal covariate shift
5           :func:`check_angular_update`            the angle a scale-invariant weight turns by
6           :func:`check_group_norm`                group norm by reshaping and calling batch norm
6           :func:`check_renorm_factors`            batch renorm's ``r`` and ``d``
7           :func:`check_batch_norm_forward`        ``F.batch_norm`` with running statistics (PyTorch's rules)
7           :func:`check_population_stats`          inference statistics with the unbiased variance
7           :func:`check_recalibrate`               "precise BN": exact running statistics for a torch model
8           :func:`check_layer_norm`                layer norm for an RNN's hidden state
8           :func:`check_masked_stats`              per-step statistics of variable-length sequences
8           :func:`check_fold_linear`               a Linear + BatchNorm1d folded into one Linear
9           :func:`check_fold_conv_bn`              a Conv2d + BatchNorm2d folded into one Conv2d (torch)
9           :func:`check_merge_stats`               SyncBN's exact merge of two ranks' ``(count, mean, M2)``
10          :func:`check_rms_norm`                  RMS norm over the last axis, with its weight
11          :func:`check_freeze_bn`                 Keras-style frozen batch norm for fine-tuning (torch)
==========  ======================================  ====================================================

:func:`reveal` prints the result of a predict-then-run cell next to the reader's prediction.

Printed output is deterministic and processor-independent: a passing verdict holds no numbers, and the numbers
of a failing one are rounded to two significant digits.
"""
from __future__ import annotations

from ._core import Result, Revealed, reveal
from .alternatives import check_group_norm, check_layer_norm, check_masked_stats, check_renorm_factors
from .deploy import check_fold_conv_bn, check_fold_linear, check_merge_stats, check_recalibrate
from .diagnose import check_freeze_bn
from .forward import (
    check_batch_norm_forward,
    check_batch_norm_train,
    check_batch_stats,
    check_identity_params,
    check_population_stats,
    check_standardize,
)
from .gradients import (
    check_angular_update,
    check_batch_norm_backward,
    check_ics_measure,
    check_scaled_output_std,
    check_steps_to_target,
)
from .modern import check_rms_norm

__all__ = [
    "Result", "Revealed", "reveal",
    "check_batch_stats", "check_standardize", "check_identity_params", "check_batch_norm_train",
    "check_batch_norm_backward", "check_scaled_output_std", "check_steps_to_target", "check_ics_measure",
    "check_angular_update", "check_group_norm", "check_renorm_factors", "check_batch_norm_forward",
    "check_population_stats", "check_recalibrate", "check_layer_norm", "check_masked_stats", "check_fold_linear",
    "check_fold_conv_bn", "check_merge_stats", "check_freeze_bn", "check_rms_norm",
]
