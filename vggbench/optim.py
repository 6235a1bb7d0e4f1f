"""The optimiser and learning-rate schedule a training config asks for."""

from __future__ import annotations

import torch
from torch import nn

from vggbench.config import TrainConfig


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam (the study), SGD with momentum, or AdamW."""
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch cosine annealing (eta_min 2e-5 in the study), with optional warm restarts."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.eta_min)
    if cfg.scheduler == "cosine_restarts":
        return sched.CosineAnnealingWarmRestarts(optimizer, T_0=cfg.restart_period, eta_min=cfg.eta_min)
    return sched.LambdaLR(optimizer, lambda epoch: 1.0)


def optimizer_states_per_parameter(cfg: TrainConfig) -> int:
    """Tensors of a parameter's size the optimiser keeps (Adam's two moments, SGD's momentum buffer)."""
    if cfg.optimizer == "sgd":
        return 1 if cfg.momentum else 0
    return 2
