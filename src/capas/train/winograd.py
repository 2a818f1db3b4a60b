"""Winograd convolution for the float32 training step on a CPU (`train.winograd`).

A 3×3 convolution computed by Winograd's minimal filtering F(4×4, 3×3) (Lavin & Gray, "Fast
Algorithms for Convolutional Neural Networks", 2015; one of cuDNN's and NNPACK's algorithms): each 6×6 tile
of the input and the 3×3 filter are carried into a 6×6 domain where the convolution is 36
independent matrix products (Cin → Cout per tile position), and 4×4 outputs come back per tile —
36 multiply-adds where a direct convolution needs 144, 4× fewer. Its backward pass is the same
three steps transposed: the gradients of the input and of the weights are two more batched matrix
products in the tile domain. PyTorch's CPU convolutions (oneDNN) compute these directly.

The transforms are products with the 36×36 and 16×36 Kronecker matrices of the 1-D ones, one pass
over the data each, batched over the tiles: the Winograd-domain tensors are tile-major (tiles, 36,
channels). On the 2-core machine measured that ran faster than one product over a (36,
tiles·channels) layout, and the 6×6 matrices one tile axis at a time (two passes) were slower than
both. With their copies the transforms cost about half as much as the tile products, so they pay
only where the convolution is wide and its output fills the 4×4 tiles (benchmarks/winograd.py,
README Performance), hence the rules of `eligible` and `pays`. The results differ from a direct
convolution by float32 rounding in the transforms (relative error ~1e-6, tests/test_winograd.py).
Only training uses it: evaluation, export and serving run the model's own convolutions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from capas.cpu import cpu_features

# F(4×4, 3×3) with the interpolation points 0, ±1, ±2, ∞ (Lavin & Gray, section 4.2)
_BT = torch.tensor(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=torch.float64,
)
_G = torch.tensor(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=torch.float64,
)
_AT = torch.tensor(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    dtype=torch.float64,
)
_BB = torch.kron(_BT, _BT)  # (36, 36): a 6×6 tile, flattened, into the Winograd domain
_AA = torch.kron(_AT, _AT)  # (16, 36): the domain's 36 products back to a 4×4 output tile

# Where it pays (benchmarks/winograd.py, batch 128, a 2-core AVX2 CPU, 2026-11-27): outputs come in
# whole 4×4 tiles, so a convolution costs about what its output rounded up to multiples of 4 would.
# With every output kept it ran 1.2–1.7× as fast as the direct convolution at 128 channels from 8×8
# to 28×28, 1.8–2.3× at 256 (1.1–1.5× at 4×4 for both), 0.86–1.05× at 64. Where fewer are kept, at
# 128 channels it lost or drew (7×7, 9×9, 13×13, 56–77% kept: 0.75–1.17×); at 256 it won where
# 66–77% were kept (7×7, 10×10, 13×13: 1.41–1.56×) and drew at 56% (6×6, 9×9: 0.98–1.17×). 3×3 and
# 5×5 outputs lost at both.
MIN_CHANNELS = 128
MIN_SIDE = 4
# the least share of the computed outputs a convolution must keep, by its narrower channel count
MIN_KEPT = ((256, 0.6), (MIN_CHANNELS, 0.8))


def pays(channels: int, ho: int, wo: int) -> bool:
    """Whether F(4×4, 3×3) is expected to be faster than the direct convolution for `channels` (the
    fewer of input and output) and an (ho, wo) output, by the measurements above."""
    if channels < MIN_CHANNELS or min(ho, wo) < MIN_SIDE:
        return False
    kept = ho * wo / (16 * -(-ho // 4) * -(-wo // 4))
    return kept >= next(least for width, least in MIN_KEPT if channels >= width)


def auto(
    device: torch.device, precision: str, compile: bool | str, flags: frozenset[str] | None = None
) -> bool:
    """What `train.winograd: auto` means for a training on `device` in `precision` (resolved, not
    'auto'): on for float32 on an x86 CPU with AVX2 and without AVX-512, the kind of CPU its
    benchmarks measured (README Performance: the seed-000 step 1.6–1.7× its direct one); off elsewhere — in
    bfloat16 and on a GPU it would compute nothing, in float32 on AVX-512 it paid little where measured
    (1.08× on an AMD EPYC without AMX, losing on some shapes `pays` takes) — and with `compile: true`,
    whose step it cannot enter. `flags`: the CPU's (capas.cpu.cpu_flags)."""
    if device.type != "cpu" or precision != "float32" or compile is True:
        return False
    features = cpu_features(flags)
    return features["avx2"] and not features["avx512"]


class _Winograd(torch.autograd.Function):
    """A 3×3, stride-1 convolution of an NHWC tensor, zero-padded by (ph, pw), with an optional bias.

    The Winograd-domain tensors are tile-major, (tiles, 36, channels): each transform is then a
    batch of small products with a Kronecker matrix, and each tile position's channel product one
    strided matrix product."""

    @staticmethod
    def forward(ctx, x, weight, bias, ph: int, pw: int) -> torch.Tensor:
        n, h, w, c = x.shape
        k = weight.shape[0]
        ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
        th, tw = -(-ho // 4), -(-wo // 4)
        # the padding, and more zeros up to whole tiles, whose extra outputs are computed and dropped
        extra_h, extra_w = 4 * th + 2 - h - ph, 4 * tw + 2 - w - pw
        if ph or pw or extra_h or extra_w:
            x = F.pad(x, (0, 0, pw, extra_w, ph, extra_h))
        x = x.contiguous()
        p = n * th * tw
        sn, sh, sw, sc = x.stride()
        # the overlapping 6×6 tiles, stride 4, as (N·th·tw, 36, C)
        tiles = x.as_strided((n, th, tw, 6, 6, c), (sn, 4 * sh, 4 * sw, sh, sw, sc)).reshape(p, 36, c)
        v = torch.matmul(_BB.to(x.dtype), tiles)
        g = _G.to(weight.dtype)
        u = torch.einsum("ia,kcab,jb->ijck", g, weight, g).reshape(36, c, k)
        m = torch.bmm(v.transpose(0, 1), u)  # (36, tiles, K)
        y = torch.matmul(_AA.to(m.dtype), m.transpose(0, 1))  # (tiles, 16, K)
        y = y.view(n, th, tw, 4, 4, k).permute(0, 1, 3, 2, 4, 5)
        out = x.new_empty(n, 4 * th, 4 * tw, k)
        if bias is None:
            out.view(n, th, 4, tw, 4, k).copy_(y)
        else:
            torch.add(y, bias, out=out.view(n, th, 4, tw, 4, k))
        ctx.save_for_backward(v, u)
        ctx.dims = (n, h, w, c, k, th, tw, ph, pw)
        return out[:, :ho, :wo]

    @staticmethod
    @once_differentiable  # it works on saved transforms without a graph: a double backward would be wrong
    def backward(ctx, grad: torch.Tensor):
        v, u = ctx.saved_tensors
        n, h, w, c, k, th, tw, ph, pw = ctx.dims
        p = n * th * tw
        db = grad.sum((0, 1, 2)) if ctx.needs_input_grad[2] else None
        # the gradient in output-tile layout (N·th·tw, 16, K), zero for the dropped outputs
        if grad.shape[1] != 4 * th or grad.shape[2] != 4 * tw:
            grad = F.pad(grad, (0, 0, 0, 4 * tw - grad.shape[2], 0, 4 * th - grad.shape[1]))
        tiled = grad.reshape(n, th, 4, tw, 4, k).permute(0, 1, 3, 2, 4, 5).reshape(p, 16, k)
        dm = torch.matmul(_AA.t().to(grad.dtype), tiled)  # (tiles, 36, K)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dv = torch.bmm(dm.transpose(0, 1), u.transpose(1, 2))  # (36, tiles, C)
            dt = torch.matmul(_BB.t().to(dv.dtype), dv.transpose(0, 1))
            dt = dt.view(n, th, tw, 6, 6, c).permute(0, 1, 3, 2, 4, 5)  # (N, th, 6, tw, 6, C)
            # tile (i, j)'s position (a, b) is row 4i + a, column 4j + b of the padded input:
            # positions 0–3 cover it once, 4–5 overlap the next tile's 0–1, and their gradients add up
            padded = grad.new_empty(n, th + 1, 4, tw + 1, 4, c)
            padded[:, th].zero_()
            padded[:, :th, :, tw].zero_()
            padded[:, :th, :, :tw].copy_(dt[:, :, :4, :, :4])
            padded[:, 1:, :2, :tw] += dt[:, :, 4:, :, :4]
            padded[:, :th, :, 1:, :2] += dt[:, :, :4, :, 4:]
            padded[:, 1:, :2, 1:, :2] += dt[:, :, 4:, :, 4:]
            dx = padded.view(n, 4 * th + 4, 4 * tw + 4, c)[:, ph : ph + h, pw : pw + w]
        if ctx.needs_input_grad[1]:
            du = torch.bmm(v.permute(1, 2, 0), dm.transpose(0, 1)).view(6, 6, c, k)
            g = _G.to(du.dtype)
            dw = torch.einsum("ia,ijck,jb->kcab", g, du, g)
        return dx, dw, db, None, None


def _padding(padding) -> tuple[int, int]:
    """conv2d's padding (an int, a pair, 'valid' or 'same') of a 3×3, stride-1 convolution as (ph, pw)."""
    padding = {"same": 1, "valid": 0}.get(padding, padding) if isinstance(padding, str) else padding
    return (padding, padding) if isinstance(padding, int) else tuple(padding)


def conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding=0
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride=1, padding=padding) for a 3×3 weight, by F(4×4, 3×3).

    x is NCHW (channels-last strides keep the NHWC work free of copies); padding an int, a pair,
    'valid' or 'same'."""
    ph, pw = _padding(padding)
    return _Winograd.apply(x.permute(0, 2, 3, 1), weight, bias, ph, pw).permute(0, 3, 1, 2)


def eligible(module: nn.Module) -> bool:
    """Whether `module` is a Conv2d whose training `Convolutions` may compute by F(4×4, 3×3): 3×3,
    stride 1, no dilation or groups, zero padding, and wide enough to pay (MIN_CHANNELS); its output
    size is checked per call (`pays`)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (3, 3)
        and module.stride == (1, 1)
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and module.in_channels >= MIN_CHANNELS
        and module.out_channels >= MIN_CHANNELS
    )


def _eligible_names(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """`model`'s eligible convolutions, named as a user knows them: in a capas network by the names
    of its summary's rows (a convolution inside a backbone row under the row's name), else by module
    path."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        return [(name, module) for name, module in model.named_modules() if eligible(module)]
    backbone = getattr(model, "backbone", None)
    rows = [] if backbone is None else list(backbone.named_children())
    named = []
    for layer_name, layer in [*rows, *layers.items()]:
        inner = [(name, module) for name, module in layer.named_modules() if eligible(module)]
        one = len(inner) == 1 and inner[0][0] in ("", "conv")  # a Conv2D layer
        named += [(layer_name if one else f"{layer_name}.{name}", module) for name, module in inner]
    return named


class Convolutions:
    """One training's Winograd convolutions: `active()` around each step's forward pass computes
    its eligible calls by F(4×4, 3×3) where they train in float32 on the CPU and their outputs are
    sized so that it pays (`pays`); every other call runs as it is. `used()` names the layers it
    computed."""

    def __init__(self, model: nn.Module, used: Iterable[str] = ()):
        named = _eligible_names(model)
        self._names = {id(module.weight): name for name, module in named}
        self._order = [name for name, _ in named]
        self._used: set[str] = set(used)  # a resumed training's: computed before its checkpoint

    def active(self) -> TorchFunctionMode:
        return _WinogradMode(self)

    def used(self) -> list[str]:
        return [name for name in self._order if name in self._used]


class _WinogradMode(TorchFunctionMode):
    def __init__(self, convolutions: Convolutions):
        super().__init__()
        self.convolutions = convolutions

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            call = self._call(*args, **kwargs)
            if call is not None:
                return conv2d(*call)
        return func(*args, **kwargs)

    def _call(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        """conv2d's arguments when this call is one of the eligible convolutions, training in float32
        on the CPU with an output size where it pays; else None (it runs as it is)."""
        name = self.convolutions._names.get(id(weight))
        if (
            name is None
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or x.dim() != 4
            or torch.is_autocast_enabled("cpu")
            or not torch.is_grad_enabled()
        ):
            return None
        ph, pw = _padding(padding)
        if not pays(min(weight.shape[:2]), x.shape[2] + 2 * ph - 2, x.shape[3] + 2 * pw - 2):
            return None
        self.convolutions._used.add(name)
        return x, weight, bias, padding
