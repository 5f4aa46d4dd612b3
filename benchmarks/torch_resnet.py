"""The PyTorch reference method for timing: a torchvision-shaped ResNet-18 written here (torchvision is not
installable) and the path-norm toolkit's recipe on it."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x):
        skip = x if self.down is None else self.down(x)
        return self.act(self.b2(self.c2(self.act(self.b1(self.c1(x))))) + skip)


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        cfg = [
            (64, 64, 1),
            (64, 64, 1),
            (64, 128, 2),
            (128, 128, 1),
            (128, 256, 2),
            (256, 256, 1),
            (256, 512, 2),
            (512, 512, 1),
        ]
        self.blocks = nn.Sequential(*[Block(*c) for c in cfg])
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class _SumPool(nn.Module):
    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        k = self.pool.kernel_size
        return F.avg_pool2d(x, k, self.pool.stride, self.pool.padding, count_include_pad=True) * (k * k)


def _companion(net: nn.Module) -> nn.Module:
    """Float64 deep copy with |weights|, BatchNorm as the affine map |a| x + |c|, ReLU -> identity, max-pool ->
    sum-pool (the path-norm toolkit's recipe)."""
    n = copy.deepcopy(net).double()
    with torch.no_grad():
        for m in n.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.abs_()
                if m.bias is not None:
                    m.bias.abs_()
            elif isinstance(m, nn.BatchNorm2d):
                a = m.weight / torch.sqrt(m.running_var + m.eps)
                c = m.bias - a * m.running_mean
                m.weight.copy_(a.abs())
                m.bias.copy_(c.abs())
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)
    for name, m in list(n.named_modules()):
        if isinstance(m, nn.ReLU):
            m.forward = lambda x: x
        elif isinstance(m, nn.MaxPool2d):
            parent = n.get_submodule(name.rsplit(".", 1)[0]) if "." in name else n
            setattr(parent, name.rsplit(".", 1)[-1], _SumPool(m))
    return n


@torch.no_grad()
def reference_pathnorm(net: nn.Module, size: int = 224) -> float:
    """||Phi||_1: one forward of the companion on the all-ones input, summed."""
    device = next(net.parameters()).device
    return float(_companion(net)(torch.ones(1, 3, size, size, dtype=torch.float64, device=device)).sum())


def reference_scores(net: nn.Module, size: int = 224) -> dict:
    """Path-magnitude scores the reference way: float64 autograd of the companion network, |theta| * grad."""
    n = _companion(net)
    n(torch.ones(1, 3, size, size, dtype=torch.float64, device=next(net.parameters()).device)).sum().backward()
    return {k: (p * p.grad).detach() for k, p in n.named_parameters()}
