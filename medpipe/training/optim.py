"""Optimisers and learning-rate schedules, chosen per model from `OptimizerConfig`.

The schedules step once per iteration: `poly` is nnU-Net's lr * (1 - t/T)^0.9 (nnU-Net
steps it per epoch; per iteration is the same curve, smoother); `cosine` is a linear warm-up
then cosine decay (MONAI's `WarmupCosineSchedule`), as Swin-UNETR and most AdamW recipes use.
"""

from __future__ import annotations

import torch
from monai.optimizers.lr_scheduler import WarmupCosineSchedule
from torch import nn
from torch.optim.lr_scheduler import ConstantLR, LRScheduler, PolynomialLR

from medpipe.training_settings import OptimizerConfig


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """Fused (one kernel for all parameters, on CPU and GPU since torch 2.4), which also lets
    the engine skip a non-finite step on the device without waiting for it (`found_inf`)."""
    if config.name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
            fused=True,
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                             fused=True)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimizerConfig, total_steps: int
) -> LRScheduler:
    if config.schedule == "poly":
        return PolynomialLR(optimizer, total_iters=total_steps, power=config.poly_exponent)
    if config.schedule == "cosine":
        warmup = round(total_steps * config.warmup_fraction)
        return WarmupCosineSchedule(optimizer, warmup_steps=warmup, t_total=total_steps)
    return ConstantLR(optimizer, factor=1.0, total_iters=0)
