"""Depthwise convolutions' backward pass in float32 while a CPU trains in bfloat16.

PyTorch's CPU backward of a depthwise convolution (groups = input channels) in bfloat16 runs at a
fraction of its float32 speed (in a profile of EfficientNet-Lite0's fine-tuning step, 5×5 depthwise
convolutions of 1,152 channels at 5×5 took several times longer in bfloat16 than in float32;
benchmarks/transfer_step.py measures the step with and without). The forward pass is as fast in
bfloat16 and stays so; only the gradients are computed in float32 and rounded back to the dtypes
they flow into. The training step turns it on with `float32_backward()` (not in a step compiled
with `compile: true`); evaluation, export and serving never see it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode


class _Conv2d(torch.autograd.Function):
    """F.conv2d forward as called; its backward in float32."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
        grad32 = grad.float()
        if memory_format is not None:
            grad32 = grad32.contiguous(memory_format=memory_format)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad32,
            x.float(),
            weight.float(),
            [weight.shape[0]] if ctx.has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            mask,
        )
        return (
            None if gx is None else gx.to(x.dtype),
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(ctx.bias_dtype),
            None,
            None,
            None,
            None,
        )


def _pair(value) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


class _Float32DepthwiseBackward(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            call = _depthwise_call(*args, **kwargs)
            if call is not None:
                return _Conv2d.apply(*call)
        return func(*args, **kwargs)


def _depthwise_call(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """The arguments for _Conv2d when this call is a bfloat16 depthwise convolution on the CPU that
    needs gradients; else None (the call runs as it is)."""
    if (
        groups == 1
        or isinstance(padding, str)  # 'same'/'valid': left to F.conv2d, which pads as it needs
        or x.device.type != "cpu"
        or x.dim() != 4
        or groups != x.shape[1]
        or not torch.is_grad_enabled()
        or not (x.requires_grad or weight.requires_grad)
        or torch.bfloat16
        not in (x.dtype, torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
    ):
        return None
    return x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups


def has_depthwise(model: torch.nn.Module) -> bool:
    """Whether `model` holds a depthwise convolution: elsewhere the mode would only add its Python
    call to every operation of the step."""
    return any(
        isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules()
    )


@contextlib.contextmanager
def float32_backward(enabled: bool = True) -> Iterator[None]:
    """While active, depthwise convolutions that run in bfloat16 on the CPU and need gradients compute
    those gradients in float32 (module forward passes inside it build the graph that way)."""
    with _Float32DepthwiseBackward() if enabled else contextlib.nullcontext():
        yield
