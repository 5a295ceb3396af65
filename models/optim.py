"""The parts of training a configuration chooses: weight initialisation, the optimizer and its parameter
groups (a pretrained backbone at a fraction of the learning rate, or frozen), the learning-rate schedule,
and the augmentation of a uint8 batch. ``train.py`` runs them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .pretrained import split_parameters

#: The optimizers ``--optimizer`` names and their default learning rates.
OPTIMIZERS = ("sgd", "momentum", "adagrad", "rmsprop", "adadelta", "adam", "adamw")
DEFAULT_LR = {"sgd": 0.05, "momentum": 0.05, "adagrad": 0.01, "rmsprop": 1e-3, "adadelta": 1.0,
              "adam": 1e-3, "adamw": 1e-3}


def init_weights(model: nn.Module, scheme: str) -> None:
    """Per layer type: convolutions and linear layers get Kaiming (fan-out, ReLU) or Xavier
    initialisation, biases zero; batch norm keeps its (1, 0) default."""
    if scheme == "default":
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
        elif isinstance(m, nn.Linear):
            if scheme == "kaiming":
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    lr, wd = cfg.lr or DEFAULT_LR[cfg.optimizer], cfg.weight_decay
    o = cfg.optimizer
    if o in ("sgd", "momentum"):
        return torch.optim.SGD(params, lr, momentum=cfg.momentum if o == "momentum" else 0.0, weight_decay=wd)
    if o == "adagrad":
        return torch.optim.Adagrad(params, lr, weight_decay=wd)
    if o == "rmsprop":
        return torch.optim.RMSprop(params, lr, weight_decay=wd)
    if o == "adadelta":
        return torch.optim.Adadelta(params, lr, weight_decay=wd)
    return (torch.optim.AdamW if o == "adamw" else torch.optim.Adam)(params, lr, weight_decay=wd)


def parameter_groups(cfg, net: nn.Module) -> list[dict]:
    """The optimizer's groups: everything at --lr; from pretrained weights, the backbone at a fraction
    of it (``backbone_lr``), or not at all with ``freeze_backbone``."""
    if not (cfg.pretrained or cfg.freeze_backbone or cfg.backbone_lr is not None):
        return [{"params": list(net.parameters())}]
    lr = cfg.lr or DEFAULT_LR[cfg.optimizer]
    backbone, head = split_parameters(net)
    if cfg.freeze_backbone:
        return [{"params": head}]
    scale = 0.1 if cfg.backbone_lr is None else cfg.backbone_lr
    return [{"params": backbone, "lr": lr * scale}, {"params": head, "lr": lr}]


def make_schedule(cfg, opt, steps_per_epoch: int):
    """Stepped once per batch: linear warm-up, then cosine decay or step decay (or constant)."""
    from torch.optim import lr_scheduler as S

    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        main = S.CosineAnnealingLR(opt, T_max=max(1, total - warm))
    elif cfg.schedule == "step":
        main = S.StepLR(opt, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma)
    else:
        main = S.ConstantLR(opt, factor=1.0, total_iters=0)
    if not warm:
        return main
    return S.SequentialLR(opt, [S.LinearLR(opt, 0.01, 1.0, total_iters=warm), main], milestones=[warm])


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by an eighth of the side, and random horizontal flip (uint8 batch)."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)
