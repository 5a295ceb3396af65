"""Layer tables, parameter counts and multiply-adds for the registry's models.

Shapes come from forward hooks, multiply-adds from ``torch.utils.flop_counter``
(FLOPs / 2), both on the meta device: no weights are allocated and no arithmetic
runs, so even VGG-19 at 224 px is summarised in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import create_model, default_spec


@dataclass
class Layer:
    name: str
    kind: str
    output: tuple[int, ...]  # without the batch axis
    params: int
    macs: int


@dataclass
class Summary:
    arch: str
    input: tuple[int, int, int]
    layers: list[Layer]
    params: int
    trainable: int
    macs: int


def summarize(model: nn.Module, input_shape: tuple[int, int, int], arch: str = "") -> Summary:
    """One row per leaf module, in execution order."""
    rows: list[Layer] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, _inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append(Layer(names[module], type(module).__name__, tuple(out.shape[1:]), params, 0))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            device = next(model.parameters()).device
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    # FlopCounterMode names modules by their dotted path under the root's class name.
    root = type(model).__name__
    counts = counter.get_flop_counts()
    for row in rows:
        row.macs = sum(counts.get(f"{root}.{row.name}", {}).values()) // 2
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Summary(arch, tuple(input_shape), rows, total, trainable, counter.get_total_flops() // 2)


def summarize_arch(name: str, num_classes: int = 1000, in_chans: int | None = None,
                   img_size: int | None = None) -> Summary:
    """Summary of a registry entry at its spec size (or the given one), built on the meta device."""
    spec = default_spec(name)
    in_chans, img_size = in_chans or spec.channels, img_size or spec.height
    with torch.device("meta"):
        model = create_model(name, num_classes, in_chans, img_size)
    return summarize(model, (in_chans, img_size, img_size), arch=name)


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def shape_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def format_table(s: Summary) -> str:
    head = ("layer", "type", "output", "params", "MACs")
    body = [(r.name, r.kind, shape_str(r.output), f"{r.params:,}", f"{r.macs:,}") for r in s.layers]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(line(head))
    out = [f"{s.arch}  input {shape_str(s.input)}", rule, line(head), rule, *map(line, body), rule,
           f"total params: {s.params:,}  (trainable {s.trainable:,})",
           f"multiply-adds: {s.macs:,}  ({human(s.macs)})"]
    return "\n".join(out)
