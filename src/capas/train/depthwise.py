"""Depthwise convolutions' backward pass on the CPU, where PyTorch's own is slow.

Three cases, each measured (benchmarks/transfer_step.py, benchmarks/depthwise.py):

- In bfloat16, PyTorch's CPU backward of a depthwise convolution (groups = input channels) runs at a
  fraction of its float32 speed (in a profile of EfficientNet-Lite0's fine-tuning step, 5×5 depthwise
  convolutions of 1,152 channels at 5×5 took several times longer in bfloat16 than in float32). The
  forward pass is as fast in bfloat16 and stays so; only the gradients are computed in float32 and
  rounded back to the dtypes they flow into.
- In any precision, the weight gradient of a depthwise convolution whose feature map is smaller than
  its kernel (a 5×5 kernel on a 4×4 map: EfficientNet's last stages on small images) takes oneDNN's
  slow path on a CPU with AVX2 and without AVX-512, several times longer than on a map of the kernel's
  size; with AVX-512 only 3×3 kernels do (on 2×2 maps: 2.3-6× slower), while 5×5 and 7×7 kernels are
  faster on their small maps than on grown ones (grown: 0.2-0.8× as fast; an AMD EPYC with AVX-512,
  2026-11-28). So where it pays, the map and its gradient are grown with zeros to the kernel's size
  first (stride 1, no dilation, sides of 2 or more; a 1×1 map grown to 5×5 computed 25× the products
  and was slower). The zeros add nothing to any sum: the weight gradient is the same but for the
  order of float32 additions.
- With AVX-512, oneDNN's float32 weight gradient of kernels over 3×3 is slow on small maps of any
  size: 24-36 ms for EfficientNet-Lite0's 5×5 kernels of 1,152 channels on 5×5 maps at batch 128,
  where its forward pass took 2-3 (ad hoc). Where the training compiles (`compile: frozen`, so a C++ compiler is
  there), `WeightGradKernel` computes those gradients as kh·kw sums of shifted products, one
  Inductor kernel per shape: 2.3-4.6× faster for that network's 5×5 kernels on outputs of 5×5 and
  10×10 at 160×160, but 0.89× on a 20×20 one (an ad-hoc grid: 0.5-0.6× on 14×14 and 20×20), so only
  outputs at most twice the kernel's side (`shift_pays`; an AMD EPYC with AVX-512, 2026-11-29,
  `benchmarks/depthwise.py --tables kernel`). The same products, summed in float32 in another order.

The training step turns it on with `backward()` (not in a step compiled with `compile: true`) for a
network with depthwise convolutions on the CPU; evaluation, export and serving never see it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from capas.cpu import cpu_flags

SHIFT_SHAPES = 8  # shapes one WeightGradKernel compiles: Dynamo's recompile limit for one function


def _shifted_products(
    x: torch.Tensor,
    grad: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """A depthwise convolution's weight gradient (C, 1, kh, kw) in float32: for each kernel offset, the
    sum over images and output positions of the input shifted by it times the output's gradient."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    x, grad = F.pad(x.float(), (pw, pw, ph, ph)), grad.float()
    ho, wo = grad.shape[-2:]
    sums = [
        (x[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] * grad).sum((0, 2, 3))
        for i in range(kh)
        for j in range(kw)
    ]
    return torch.stack(sums, 1).view(-1, 1, kh, kw)


class WeightGradKernel:
    """`_shifted_products` compiled by Inductor, one kernel per shape (input, gradient, their dtypes
    and memory formats, kernel, stride, padding), for one training: at most SHIFT_SHAPES of them, past
    which the call returns None and oneDNN computes the gradient. Dynamo's caches die with the
    training (`fit` resets them when it compiled)."""

    def __init__(self) -> None:
        self._compiled = torch.compile(_shifted_products, dynamic=False)
        self._shapes: set[tuple] = set()

    def __call__(
        self,
        x: torch.Tensor,
        grad: torch.Tensor,
        kernel: tuple[int, int],
        stride: list[int],
        padding: list[int],
    ) -> torch.Tensor | None:
        key = (x.shape, x.stride(), x.dtype, grad.shape, grad.stride(), grad.dtype, kernel, *stride, *padding)
        if key not in self._shapes:
            if len(self._shapes) >= SHIFT_SHAPES:
                return None
            self._shapes.add(key)
        return self._compiled(x, grad, kernel, (stride[0], stride[1]), (padding[0], padding[1]))


def shift_pays(
    x_shape: torch.Size,
    w_shape: torch.Size,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    flags: frozenset[str] | None = None,
) -> bool:
    """Whether WeightGradKernel beats oneDNN at this depthwise convolution's weight gradient, where
    measured: with AVX-512, kernels over 3×3 (one output channel per input channel) whose outputs are
    at most twice the kernel's side."""
    if dilation != [1, 1] or w_shape[0] != x_shape[1] or max(w_shape[-2:]) <= 3:
        return False
    if "avx512f" not in (cpu_flags() if flags is None else flags):
        return False
    out = [
        (side + 2 * pad - k) // s + 1
        for side, pad, k, s in zip(x_shape[-2:], padding, w_shape[-2:], stride, strict=True)
    ]
    return all(1 <= o <= 2 * k for o, k in zip(out, w_shape[-2:], strict=True))


class _Conv2d(torch.autograd.Function):
    """F.conv2d forward as called; its backward in float32, the weight gradient on grown maps or by
    `kernel` (a WeightGradKernel, or None)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, kernel):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype
        ctx.conv = (stride, padding, dilation, groups)
        ctx.kernel = kernel
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
        grad32, x32, w32 = grad.float(), x.float(), weight.float()
        if memory_format is not None:
            grad32 = grad32.contiguous(memory_format=memory_format)
        grow = growth(x.shape, weight.shape, stride, dilation)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        shifted = None
        if need_w and ctx.kernel is not None:
            shifted = ctx.kernel(x, grad, (weight.shape[-2], weight.shape[-1]), stride, padding)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad32,
            x32,
            w32,
            [weight.shape[0]] if ctx.has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [need_x, need_w and shifted is None and grow is None, need_b],
        )
        if shifted is not None:
            gw = shifted
        elif need_w and grow is not None:
            gw = grown_weight_grad(grad32, x32, w32, padding, groups, grow, memory_format)
        return (
            None if gx is None else gx.to(x.dtype),
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(ctx.bias_dtype),
            None,
            None,
            None,
            None,
            None,
        )


def growth(
    x_shape: torch.Size,
    w_shape: torch.Size,
    stride: list[int],
    dilation: list[int],
    flags: frozenset[str] | None = None,
) -> tuple[int, int] | None:
    """Rows and columns of zeros that bring a map smaller than its kernel to the kernel's size, or None
    where oneDNN's weight gradient is already on its fast path (or growing would not pay, or not be exact).
    `flags`: the CPU's (capas.cpu.cpu_flags), whose AVX-512 kernels are fast for kernels over 3×3."""
    if stride != [1, 1] or dilation != [1, 1]:
        return None
    if max(w_shape[-2:]) > 3 and "avx512f" in (cpu_flags() if flags is None else flags):
        return None
    grow = [k - side if 2 <= side < k else 0 for side, k in zip(x_shape[-2:], w_shape[-2:], strict=True)]
    return None if grow == [0, 0] else (grow[0], grow[1])


def grown_weight_grad(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    padding: list[int],
    groups: int,
    grow: tuple[int, int],
    memory_format: torch.memory_format | None,
) -> torch.Tensor:
    """The weight gradient of a stride-1 convolution computed on `x` and `grad` with `grow` rows
    and columns of zeros added below and to the right: the output grows by as much, and every added
    term of the gradient's sums multiplies a zero of the map or of its gradient."""
    rows, cols = grow
    x, grad = F.pad(x, (0, cols, 0, rows)), F.pad(grad, (0, cols, 0, rows))
    if memory_format is not None:
        x, grad = x.contiguous(memory_format=memory_format), grad.contiguous(memory_format=memory_format)
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], padding, [1, 1], False, [0, 0], groups, [False, True, False]
    )[1]


def _pair(value) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


class _DepthwiseBackward(TorchFunctionMode):
    def __init__(self, kernel: WeightGradKernel | None):
        super().__init__()
        self.kernel = kernel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            call = _depthwise_call(self.kernel, *args, **kwargs)
            if call is not None:
                return _Conv2d.apply(*call)
        return func(*args, **kwargs)


def _depthwise_call(kernel, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """The arguments for _Conv2d when this call is a depthwise convolution on the CPU that needs
    gradients, in bfloat16, with a weight gradient on a map smaller than its kernel, or with one
    that `kernel` (a WeightGradKernel, or None) computes faster (shift_pays); else None (the call runs
    as it is)."""
    if (
        groups == 1
        or isinstance(padding, str)  # 'same'/'valid': left to F.conv2d, which pads as it needs
        or x.device.type != "cpu"
        or x.dim() != 4
        or groups != x.shape[1]
        or not torch.is_grad_enabled()
        or not (x.requires_grad or weight.requires_grad)
    ):
        return None
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    bfloat16 = torch.bfloat16 in (
        x.dtype,
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
    )
    small_map = weight.requires_grad and growth(x.shape, weight.shape, stride, dilation) is not None
    if kernel is not None and not (
        weight.requires_grad and shift_pays(x.shape, weight.shape, stride, padding, dilation)
    ):
        kernel = None
    if not (bfloat16 or small_map or kernel is not None):
        return None
    return x, weight, bias, stride, padding, dilation, groups, kernel


def has_depthwise(model: torch.nn.Module) -> bool:
    """Whether `model` holds a depthwise convolution: elsewhere the mode would only add its Python
    call to every operation of the step."""
    return any(
        isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules()
    )


@contextlib.contextmanager
def backward(enabled: bool = True, kernel: WeightGradKernel | None = None) -> Iterator[None]:
    """While active, depthwise convolutions on the CPU that need gradients compute them as the module
    says (float32 for bfloat16; grown maps for weight gradients on maps smaller than the kernel; with
    `kernel`, the weight gradients where shift_pays by it); module forward passes inside it build the
    graph that way."""
    with _DepthwiseBackward(kernel) if enabled else contextlib.nullcontext():
        yield
