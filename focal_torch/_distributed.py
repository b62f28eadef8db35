"""Exact global normalization under torch.distributed / DDP, and the RetinaNet positive normalizer."""

from __future__ import annotations

from typing import Any

import torch

import focal_spec
from focal_torch import _common as C


def _world_size(process_group: Any) -> int:
    import torch.distributed as dist

    return dist.get_world_size(process_group)


def _all_reduce_sum(value: torch.Tensor, process_group: Any) -> torch.Tensor:
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=process_group)
    return value


def differentiable_sum(value: torch.Tensor, process_group: Any) -> torch.Tensor:
    """The sum of ``value`` over the ranks of ``process_group``, with its gradient: the backward sums every
    rank's cotangent (``torch.distributed.nn``), so that a normalizer shared by all ranks is differentiated
    exactly, as ``jax.lax.psum`` is over an ``axis_name``."""
    from torch.distributed.nn import functional as dist_fn

    return dist_fn.all_reduce(value, group=process_group)


def mean_scale(count: torch.Tensor | int | float, process_group: Any, *, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor | float:
    """The factor that turns a local sum into the returned mean: 1/den, with den the count (or the sum of
    weights) whatever its sign, or with a process group world_size/global_den (so that DDP's averaging of
    gradients over ranks gives the global mean's gradient). Zero when den is exactly 0. Never carries a
    gradient."""
    if process_group is None:
        if isinstance(count, torch.Tensor):
            d = count.detach().to(dtype)
            return torch.where(d != 0, 1.0 / d, torch.zeros((), dtype=dtype, device=d.device))
        return 1.0 / count if count != 0 else 0.0
    d = torch.as_tensor(count, device=device).detach().to(dtype)
    d = _all_reduce_sum(d, process_group)
    world = float(_world_size(process_group))
    return torch.where(d != 0, world / d, torch.zeros((), dtype=dtype, device=d.device))


def positive_normalizer(
    target: torch.Tensor,
    *,
    where: torch.Tensor | None = None,
    process_group: Any = None,
) -> torch.Tensor:
    r"""RetinaNet-style normalizer: the number of positives in the global batch, at least 1.

    .. math::
        Z = \max\Big(\sum_{\text{ranks}} \sum_{i\,:\,\mathrm{where}_i} t_i,\ 1\Big) \,/\, \text{world size}

    Use it as ``sigmoid_focal_loss(..., reduction="sum") / positive_normalizer(target)``. Without a
    process group the world size is 1. With one, the sum is all-reduced and divided by the world
    size, so that under DDP (which averages gradients over ranks) ``loss_sum / Z`` gives exactly the
    gradient of the global sum over the global number of positives.

    Args:
      target: targets of any shape (floating, integer or boolean dtype); soft targets count their mass.
      where: optional boolean tensor broadcasting to ``target``; ``False`` positions are not counted,
        whatever they hold.
      process_group: optional ``torch.distributed`` process group to sum over.

    Returns:
      A 0-d tensor on ``target``'s device, float32 (float64 for float64 targets), without gradient.

    Raises:
      TypeError: a non-numeric ``target`` dtype.
      ValueError: a ``where`` shape that does not broadcast to ``target``.

    Examples:
      >>> import torch
      >>> from focal_torch import positive_normalizer
      >>> t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
      >>> print(f"{positive_normalizer(t).item():.1f}")
      3.0
      >>> print(f"{positive_normalizer(torch.zeros(4)).item():.1f}")
      1.0

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, arXiv:1708.02002.
    """
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target)
    dtype = C.compute_dtype(target.dtype)
    # The spec's sigmoid validation checks the target dtype and the where shape (no other option).
    focal_spec.sigmoid_options(tuple(target.shape), dtype, tuple(target.shape), target.dtype,
                               gamma=focal_spec.GAMMA, alpha=None, weight_shape=None,
                               label_smoothing=0.0, where_shape=C.shape_of(where), reduction="sum")
    with torch.no_grad():
        t = target.detach().to(dtype)
        if where is not None:
            mask = C.as_tensor(where, dtype=torch.bool, device=target.device)
            # C.as_tensor returns None only for None, excluded above
            t = torch.where(mask, t, 0.0)  # type: ignore[arg-type]
        total = t.sum()
        world = 1.0
        if process_group is not None:
            total = _all_reduce_sum(total, process_group)
            world = float(_world_size(process_group))
        return torch.clamp(total, min=1.0) / world
