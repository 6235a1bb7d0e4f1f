"""The optimiser and learning-rate schedule a training config asks for."""

from __future__ import annotations

import torch
from torch import nn

from vggbench.config import TrainConfig


def make_optimizer(cfg: TrainConfig, model: nn.Module, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam (the study), SGD with momentum, or AdamW.

    `capturable`: Adam and AdamW keep their step counts on the device, so that a CUDA graph can
    capture their step (SGD's step is capturable as it is).
    """
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay, capturable=capturable)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch cosine annealing (eta_min 2e-5 in the study), with optional warm restarts."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.eta_min)
    if cfg.scheduler == "cosine_restarts":
        return sched.CosineAnnealingWarmRestarts(optimizer, T_0=cfg.restart_period, eta_min=cfg.eta_min)
    return sched.LambdaLR(optimizer, lambda epoch: 1.0)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state) with the optimiser's own `capturable` setting: a checkpoint
    records its run's, and a run may be resumed with or without --cuda-graphs (the setting also
    decides where the step counts are loaded to: the device when capturable, else the CPU)."""
    groups = [{**saved, "capturable": own["capturable"]} if "capturable" in own else saved
              for saved, own in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def optimizer_states_per_parameter(cfg: TrainConfig) -> int:
    """Tensors of a parameter's size the optimiser keeps (Adam's two moments, SGD's momentum buffer)."""
    if cfg.optimizer == "sgd":
        return 1 if cfg.momentum else 0
    return 2
