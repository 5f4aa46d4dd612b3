"""Torch architectures for tests/test_exporters.py and their float64 path-norm reference (path-norm toolkit
style, theory.md section 2), computed on the framework side, independently of onnxlip.

Reference: deep-copy the model to float64, replace every activation by its companion (ReLU -> identity,
LeakyReLU(a) -> (|1-c|^q + |c-a|^q + c^q) x with c = a clipped to [0, 1],
ReLU6 = ReLU(x) - ReLU(x - 6) -> 2 x + 6^q, max -> sum, max-pool -> sum-pool, average pool keeps its weights
1/K as (1/K)^q), BatchNorm (eval) by the affine map
|a|^q x + |c|^q with a = gamma/sqrt(var+eps), c = beta - a*mean, every other weight and bias by |w|^q, feed
all-ones and sum every output: the result is ||Phi||_q^q.

Every Conv followed by a BatchNorm has bias=False (the exporters fold BN into the conv; without a conv bias
folding leaves the path-norm unchanged). Importing this module needs torch.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


# ---- building blocks whose companion is not "the same op with |w|^q" -------------------------------------------
class Max2(nn.Module):
    """Elementwise max of two tensors (exported as ONNX Max); its companion is the sum."""

    def __init__(self):
        super().__init__()
        self.companion = False

    def forward(self, a, b):
        return a + b if self.companion else torch.max(a, b)


class Min2(nn.Module):
    """Elementwise min of two tensors (ONNX Min); Min(a, b) = -Max(-a, -b), so its companion is the sum too."""

    def __init__(self):
        super().__init__()
        self.companion = False

    def forward(self, a, b):
        return a + b if self.companion else torch.min(a, b)


class _Scale(nn.Module):
    def __init__(self, gain: float, const: float = 0.0):
        super().__init__()
        self.gain, self.const = gain, const

    def forward(self, x):
        return self.gain * x + self.const


class _ChannelAffine(nn.Module):
    def __init__(self, scale: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.bias.view(shape)


class _PoolCompanion(nn.Module):
    """Companion of a pooling layer: window sums (zero padding) of a max-pool, as a depthwise ones-kernel conv;
    an average pool multiplies each window sum by (1/divisor)^q. ceil_mode windows that run past the end are
    zero-padded on the right (the output size is read off the real pool)."""

    def __init__(self, pool: nn.Module, q: float):
        super().__init__()
        self.pool, self.q = copy.deepcopy(pool), q
        self.dims = 1 if isinstance(pool, (nn.MaxPool1d, nn.AvgPool1d)) else 2
        as_tuple = lambda v: (v,) * self.dims if isinstance(v, int) else tuple(v)  # noqa: E731
        self.kernel, self.stride = as_tuple(pool.kernel_size), as_tuple(pool.stride)
        self.padding = as_tuple(pool.padding)
        self.dilation = as_tuple(getattr(pool, "dilation", 1))
        self.average = isinstance(pool, (nn.AvgPool1d, nn.AvgPool2d))

    def _window_sums(self, x):
        out_size = self.pool(x).shape[2:]
        extra = []
        for n, k, s, p, d, size in zip(out_size, self.kernel, self.stride, self.padding, self.dilation, x.shape[2:]):
            extra.append(max((n - 1) * s + (k - 1) * d + 1 - size - 2 * p, 0))
        pad = []
        for e in reversed(extra):  # F.pad lists the last dimension first
            pad += [0, e]
        ones = torch.ones((x.shape[1], 1, *self.kernel), dtype=x.dtype)
        conv = F.conv1d if self.dims == 1 else F.conv2d
        out = conv(F.pad(x, pad), ones, None, self.stride, self.padding, self.dilation, groups=x.shape[1])
        return out[(..., *[slice(0, n) for n in out_size])]

    def forward(self, x):
        sums = self._window_sums(x)
        if not self.average:
            return sums
        if self.pool.count_include_pad:
            divisor = torch.full_like(sums, float(math.prod(self.kernel)))
        else:
            divisor = self._window_sums(torch.ones_like(x))
        return sums * (1.0 / divisor) ** self.q


class _GlobalAvgCompanion(nn.Module):
    def __init__(self, q: float):
        super().__init__()
        self.q = q

    def forward(self, x):
        count = math.prod(x.shape[2:])
        return x.sum(dim=tuple(range(2, x.dim())), keepdim=True) * (1.0 / count) ** self.q


class _GlobalSumCompanion(nn.Module):
    """The companion of a global max pool: every entry of the window is a path (max -> sum)."""

    def forward(self, x):
        return x.sum(dim=tuple(range(2, x.dim())), keepdim=True)


def _companion_module(module: nn.Module, q: float) -> nn.Module | None:
    if isinstance(module, nn.ReLU):
        return nn.Identity()
    if isinstance(module, nn.ReLU6):  # Clip(0, 6) = ReLU(x) - ReLU(x - 6): two ReLU neurons, bias path 6
        return _Scale(2.0, 6.0**q)
    if isinstance(module, nn.LeakyReLU):  # (1 - c) ReLU(x) + (c - a) ReLU(-x) + c x, c = a clipped to [0, 1]
        a = module.negative_slope
        c = min(max(a, 0.0), 1.0)
        return _Scale(abs(1 - c) ** q + abs(c - a) ** q + c**q)
    if isinstance(module, nn.PReLU):  # the same per channel
        a = module.weight.detach().double()
        c = a.clamp(0.0, 1.0)
        return _ChannelAffine((1 - c).abs() ** q + (c - a).abs() ** q + c**q, torch.zeros_like(a))
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
        return _PoolCompanion(module, q)
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        size = module.output_size
        assert size in (1, (1, 1), (1,)), "only global average pooling is modelled"
        return _GlobalAvgCompanion(q)
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
        assert module.output_size in (1, (1, 1), (1,)), "only global max pooling is modelled"
        return _GlobalSumCompanion()
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        a = module.weight.detach() / torch.sqrt(module.running_var + module.eps)
        c = module.bias.detach() - a * module.running_mean
        return _ChannelAffine(a.abs() ** q, c.abs() ** q)
    return None


def _swap(module: nn.Module, q: float) -> None:
    for name, child in module.named_children():
        if isinstance(child, (Max2, Min2)):
            child.companion = True
            continue
        new = _companion_module(child, q)
        if new is not None:
            setattr(module, name, new)
        else:
            _swap(child, q)


def companion(model: nn.Module, q: float) -> nn.Module:
    """The float64 absolute-value companion of `model` (theory.md section 2)."""
    comp = copy.deepcopy(model).double().eval()
    _swap(comp, q)  # BatchNorm first: its affine map is computed from the signed statistics
    with torch.no_grad():
        for p in comp.parameters():
            p.copy_(p.abs() ** q)
    return comp


def reference_pathnorm(model: nn.Module, input_shape: tuple[int, ...], q: float) -> float:
    """||Phi||_q (the q-th root of the companion's output sum on all-ones, batch 1), in float64."""
    with torch.no_grad():
        out = companion(model, q)(torch.ones((1, *input_shape), dtype=torch.float64))
    total = sum(float(o.sum()) for o in (out if isinstance(out, (tuple, list)) else (out,)))
    return total ** (1.0 / q)


def randomize(model: nn.Module, seed: int, gain: float = 1.5) -> nn.Module:
    """Larger-than-default weights and non-trivial BatchNorm statistics; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                fan_in = m.weight[0].numel() if not isinstance(m, nn.ConvTranspose2d) else m.weight[:, 0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * gain / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
            elif isinstance(m, nn.PReLU):  # learned slopes, one per channel, some outside [0, 1]
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 3.0 - 1.0)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.randn(n, generator=gen) * 1.5)  # some negative gammas
                m.bias.copy_(torch.randn(n, generator=gen) * 0.7)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 2.0)
                m.running_var.copy_(torch.rand(n, generator=gen) * 3.0 + 0.2)
    return model.eval()


# ---- architectures ----------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class MiniResNet(nn.Module):
    """ResNet-18 in miniature: 7x7/2 stem + BN + ReLU + 3x3/2 max-pool, basic blocks, global average pool."""

    input_shape = (3, 32, 32)

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvZoo(nn.Module):
    """Strided, grouped, dilated and depthwise convs; LeakyReLU(0.1), ReLU6, eval dropout, a BatchNorm after a
    max-pool (not foldable into a conv), an average pool with count_include_pad=False, conv biases."""

    input_shape = (4, 16, 16)

    def __init__(self):
        super().__init__()
        self.strided = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.relu6 = nn.ReLU6()
        self.dilated = nn.Conv2d(8, 6, 3, padding=2, dilation=2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pool = nn.MaxPool2d(2)
        self.bn_after_pool = nn.BatchNorm2d(6)
        self.relu2 = nn.ReLU()
        self.avg = nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        x = self.leaky(self.strided(x))  # (N, 8, 8, 8)
        x = self.relu6(self.grouped(x))
        x = self.relu(self.bn(self.dilated(x)))  # (N, 6, 8, 8)
        x = self.relu2(self.bn_after_pool(self.pool(self.depthwise(x))))  # (N, 6, 4, 4)
        x = self.avg(x)  # (N, 6, 2, 2)
        return self.fc(self.drop(x.reshape(x.shape[0], -1)))


class Conv1dNet(nn.Module):
    """Conv1d + BN + ReLU + MaxPool1d (ceil_mode), a strided Conv1d with bias, global average pool, and a
    Linear without bias + BatchNorm1d on a (N, C) tensor."""

    input_shape = (3, 40)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(8)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool1d(3, 2, 1, ceil_mode=True)  # 40 -> 21 (20 without ceil_mode)
        self.conv2 = nn.Conv1d(8, 6, 3, stride=2)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc1 = nn.Linear(6, 8, bias=False)
        self.bn2 = nn.BatchNorm1d(8)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.gap(self.relu2(self.conv2(x)))
        x = self.relu3(self.bn2(self.fc1(x.view(x.shape[0], -1))))
        return self.fc2(x)


class TransposeNet(nn.Module):
    """Grouped ConvTranspose2d with stride 2, padding and output_padding; a second grouped one followed by a
    BatchNorm (which the TorchScript exporter leaves to onnxlip to fold into the ConvTranspose)."""

    input_shape = (4, 6, 6)

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.relu1 = nn.ReLU()
        self.up2 = nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu2 = nn.ReLU()
        self.head = nn.Conv2d(4, 2, 3, stride=3)

    def forward(self, x):
        x = self.relu1(self.up1(x))
        x = self.relu2(self.bn(self.up2(x)))
        return self.head(x)


class MixNet(nn.Module):
    """torch.cat (Concat), torch.max / torch.min of two tensors (Max / Min), F.pad with zeros,
    nn.Upsample(nearest), permute / reshape, and a Linear applied to the last axis of a rank-3 tensor (MatMul).
    dynamic_view=True ends with x.view(x.shape[0], -1) after the F.pad (the TorchScript exporter emits
    Shape -> Gather -> Unsqueeze -> Concat for it); False ends with torch.flatten (an ONNX Flatten)."""

    input_shape = (3, 8, 8)

    def __init__(self, dynamic_view: bool = False):
        super().__init__()
        self.dynamic_view = dynamic_view
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.relu_a = nn.ReLU()
        self.relu_b = nn.ReLU()
        self.max = Max2()
        self.min = Min2()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c = nn.Conv2d(12, 4, 3, stride=2)
        self.relu_c = nn.ReLU()
        self.token = nn.Linear(4, 6)
        self.relu_t = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 9 * 9, 4)

    def forward(self, x):
        a = self.relu_a(self.a(x))
        b = self.relu_b(self.b(x))
        y = torch.cat([self.max(a, b), a, self.min(a, b)], dim=1)  # (N, 12, 8, 8)
        y = self.up(y)  # (N, 12, 16, 16)
        y = F.pad(y, (1, 2, 0, 3))  # (N, 12, 19, 19)
        y = self.relu_c(self.c(y))  # (N, 4, 9, 9)
        t = y.permute(0, 2, 3, 1).reshape(-1, 81, 4)  # tokens
        t = self.drop(self.relu_t(self.token(t)))  # (N, 81, 6)
        t = t.view(t.shape[0], -1) if self.dynamic_view else torch.flatten(t, 1)
        return self.fc(t)


class UNet(nn.Module):
    """An image-to-image network: reflection and replication padding (Pad in reflect / edge mode), conv + BatchNorm
    + ReLU, MaxPool down, ConvTranspose (with a per-channel PReLU) and nearest Upsample up, skip connections by
    torch.cat."""

    input_shape = (2, 8, 8)

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.down = nn.MaxPool2d(2)
        self.mid = nn.Sequential(nn.ReplicationPad2d((1, 0, 1, 0)), nn.Conv2d(4, 6, 2), nn.ReLU())
        self.up_t = nn.ConvTranspose2d(6, 3, 2, stride=2)
        self.up_n = nn.Upsample(scale_factor=2, mode="nearest")
        self.relu_up = nn.PReLU(3)
        self.dec = nn.Sequential(nn.ReflectionPad2d((2, 1, 1, 2)), nn.Conv2d(4 + 3 + 6, 4, (4, 4)), nn.ReLU())
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        e = self.enc(x)  # (N, 4, 8, 8)
        m = self.mid(self.down(e))  # (N, 6, 4, 4)
        u = torch.cat([e, self.relu_up(self.up_t(m)), self.up_n(m)], dim=1)  # (N, 13, 8, 8)
        return self.head(self.dec(u))


class DenseNet(nn.Module):
    """Pre-activation dense blocks: BatchNorm -> ReLU -> conv on the concatenation of all earlier features (a
    BatchNorm after a Concat cannot be folded into a linear op: a diagonal affine layer), and an average-pooling
    transition."""

    input_shape = (3, 8, 8)

    def __init__(self, growth: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(4 + i * growth), nn.ReLU(), nn.Conv2d(4 + i * growth, growth, 3, padding=1))
            for i in range(3)
        )
        self.transition = nn.Sequential(nn.BatchNorm2d(13), nn.ReLU(), nn.Conv2d(13, 6, 1), nn.AvgPool2d(2))
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return self.head(torch.flatten(self.transition(torch.cat(features, dim=1)), 1))


class Interpolating(nn.Module):
    """F.interpolate in bilinear mode (align_corners both ways, by scale factor and by size) and in bicubic mode:
    Resize in linear / cubic mode. (The torch companion reuses the same interpolation, which is the companion for
    q = 1 only, where the bilinear coefficients, all >= 0, stay as they are.)"""

    input_shape = (2, 6, 5)

    def __init__(self, mode: str = "bilinear", align_corners: bool = False, by_size: bool = False):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3)
        self.relu_a, self.relu_b = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(2 * 10 * 8, 3)
        self.mode, self.align_corners, self.by_size = mode, align_corners, by_size

    def forward(self, x):
        h = self.relu_a(self.a(x))
        size = dict(size=(12, 10)) if self.by_size else dict(scale_factor=2)
        h = F.interpolate(h, mode=self.mode, align_corners=self.align_corners, **size)
        return self.fc(torch.flatten(self.relu_b(self.b(h)), 1))


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The conv with the BatchNorm folded in (W' = a W, b' = a b + c), in float64."""
    fused = copy.deepcopy(conv).double()
    a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    c = bn.bias.detach().double() - a * bn.running_mean.double()
    with torch.no_grad():
        fused.weight.mul_(a.view(-1, 1, 1, 1))
        bias = fused.bias if fused.bias is not None else torch.zeros_like(a)
        fused.bias = nn.Parameter(a * bias + c)
    return fused


class ConvBiasBN(nn.Module):
    """Conv2d WITH a bias followed by a BatchNorm. Its path-norm is that of the folded conv (theory.md section 3:
    folding gives an equal or smaller value; onnxlip folds, and so does the TorchScript exporter by default)."""

    input_shape = (2, 6, 6)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(3, 2, 2, stride=2)

    def forward(self, x):
        return self.head(self.relu(self.bn(self.conv(x))))

    def folded(self) -> nn.Module:
        return nn.Sequential(fold_conv_bn(self.conv, self.bn), nn.ReLU(), copy.deepcopy(self.head)).eval()


class Shuffle(nn.Module):
    """Layers the two exporters write differently: a channel split (torch.chunk: two Slices or one Split), a channel
    shuffle (view, transpose, view), a circular-padding conv (Slices and Concats, or a wrapping Pad), torch.roll
    (Slices whose end is INT64_MAX or the extent), torch.flip (a Slice with step -1) and nn.AdaptiveMaxPool2d(1)
    (a MaxPool over the whole map, or a ReduceMax)."""

    input_shape = (4, 6, 6)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.circular = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(4 * 36 + 4, 3)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.relu(self.conv(b))], 1)  # (N, 4, 6, 6)
        n = y.shape[0]
        y = y.view(n, 2, 2, 6, 6).transpose(1, 2).reshape(n, 4, 6, 6)
        y = self.relu2(self.circular(y))
        y = torch.roll(y, shifts=(1, -2), dims=(2, 3)).flip(-1)
        return self.fc(torch.cat([y.flatten(1), torch.flatten(self.pool(y), 1)], 1))


ARCHITECTURES = {
    "resnet": MiniResNet,
    "convzoo": ConvZoo,
    "conv1d": Conv1dNet,
    "transpose": TransposeNet,
    "mix": MixNet,
    "mix_view": lambda: MixNet(dynamic_view=True),
    "unet": UNet,
    "densenet": DenseNet,
    "conv_bias_bn": ConvBiasBN,
    "shuffle": Shuffle,
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(ARCHITECTURES[name](), seed)


def export(model: nn.Module, path, dynamo: bool, dynamic_batch: bool, **extra) -> None:
    """torch.onnx.export with either exporter; a dynamic batch axis named 'batch' or a fixed batch of 1."""
    shape = model.input_shape
    x = torch.randn((2 if dynamic_batch else 1, *shape))
    kwargs = dict(input_names=["x"], output_names=["y"], dynamo=dynamo, **extra)
    if dynamo:
        kwargs["verbose"] = False
        if dynamic_batch:
            kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    else:
        if dynamic_batch:
            kwargs["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kwargs)
