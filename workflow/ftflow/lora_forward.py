"""A training forward for PEFT's plain LoRA layers on the CPU that spends less outside the matmuls.

PEFT computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`.
On a CPU, with the small ranks people use, the two LoRA matmuls are cheap and
most of the layer's extra time goes to three element-wise passes over large
tensors (measured with `python -m ftflow.bench.profile_step ftflow lora`):

- the dropout mask: torch draws one random number per element (`bernoulli_`),
  15% of a step of the embedded default's lora-r16 job;
- the multiply by `scaling`, over the layer's whole output, forward and back;
- the add of the LoRA output onto the base output.

`fast_lora_forward` computes the same function with less of that work:

- the mask takes 16 random bits per element (one 64-bit draw gives four), 15
  of them compared with p rounded to 1/32768, so an element is dropped with
  probability p (within 1/65536) and the kept ones are scaled by 1/(1 - that
  probability), the rounded one: the expectation stays exactly x;
- `scaling` is folded into that same multiply (LoRA is linear in its input), or,
  without dropout, applied to the rank-r activations, a tensor of r columns;
- the LoRA product is added onto the base output by one `addmm`.

Where the base layer is frozen (LoRA's case), the whole layer is one autograd
function that keeps, for backward, the layer's input, a one-byte mask and the
rank-r activations. Autograd on PEFT's forward keeps two full-width tensors per
adapted layer instead (the dropped input for lora_A's gradient and the float
mask for the input's), although q, k and v, or gate and up, read one input: on
the embedded default's lora-r16 job that is about 22 KB less per token per
layer. Backward recomputes the dropped input for lora_A's gradient, one
element-wise pass, where autograd would have read it back.

The random stream differs from `nn.Dropout`'s, so a run is reproducible from its
seed but its masks are not the ones stock PEFT would draw. It is used only where
it is exactly PEFT's computation otherwise: training mode, a CPU tensor, one
active adapter without a variant (DoRA) or LoRA bias, a plain `nn.Linear` base
and no autocast; every other call runs PEFT's own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

MASK_BITS = 15
MASK_SCALE = 1 << MASK_BITS  # thresholds are in units of 1/32768


def drop_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor | None, float]:
    """A training-mode dropout mask for `x` (True where an element is dropped) from 15 random bits per
    element, and the kept fraction.

    None where nothing is dropped (p rounds to 0); the kept fraction is 1 - round(p * 32768) / 32768.
    Applied with `masked_fill`, which needs no float copy of the mask (a bool * float multiply makes one).
    """
    threshold = round(p * MASK_SCALE)
    if threshold <= 0:
        return None, 1.0
    if threshold >= MASK_SCALE:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device), 0.0
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    # random_() fills an int64 with 63 random bits: each of its four 16-bit words has at least 15
    bits = draws.view(torch.int16)[:n].view(x.shape)
    return torch.bitwise_and(bits, MASK_SCALE - 1) < threshold, 1.0 - threshold / MASK_SCALE


def lora_linear(inp, weight, bias, weight_a, weight_b, p: float, scaling: float, scratch: bool = False):
    """`inp @ W.T + bias + dropout(inp) @ A.T @ B.T * scaling` for a 2-D `inp`, with drop_mask's mask.

    Returns (output, drop mask or None, the scaled rank-r activations, their factor
    scaling / kept fraction). `scratch`: `inp` is the caller's to overwrite (its
    dropped elements are zeroed in place). Differentiable as it stands (autograd
    saves nothing its in-place steps overwrite); FrozenBaseLoraLinear and
    gated_mlp.SwiGLUDown give it the lean backward, lora_linear_backward.
    """
    drop, kept = drop_mask(inp, p) if p > 0 else (None, 1.0)
    factor = scaling / kept if kept > 0 else 0.0
    result = F.linear(inp, weight, bias)
    dropped = inp if drop is None else (inp.masked_fill_(drop, 0.0) if scratch else inp.masked_fill(drop, 0.0))
    low = F.linear(dropped, weight_a)
    if factor != 1.0:
        low.mul_(factor)  # r columns
    result.addmm_(low, weight_b.t())
    return result, drop, low, factor


def lora_linear_backward(grad, inp, drop, low, weight, weight_a, weight_b, factor: float, needs, scratch=False):
    """(input, A, B) gradients of lora_linear with a frozen W for the 2-D output gradient `grad`.

    `inp`: the layer's input (read only for A's gradient); `needs`: which of the three
    are wanted (None for the others); `scratch` as in lora_linear.
    """
    needs_input, needs_a, needs_b = needs
    grad_input = grad_a = grad_b = None
    grad_low = (grad @ weight_b).mul_(factor) if (needs_input or needs_a) else None
    if needs_b:
        grad_b = grad.t() @ low
    if needs_a:
        dropped = inp if drop is None else (inp.masked_fill_(drop, 0.0) if scratch else inp.masked_fill(drop, 0.0))
        grad_a = grad_low.t() @ dropped
    if needs_input:
        grad_input = grad_low @ weight_a
        if drop is not None:
            grad_input.masked_fill_(drop, 0.0)
        grad_input.addmm_(grad, weight)  # in place: no copy of the LoRA term first
    return grad_input, grad_a, grad_b


class FrozenBaseLoraLinear(torch.autograd.Function):
    """lora_linear for a frozen base layer as one autograd node.

    Saved for backward: x (one tensor however many layers read it), the boolean
    mask, and the rank-r activations; the dropped input is recomputed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_a, weight_b, p: float, scaling: float):
        flat = x.reshape(-1, x.shape[-1])
        result, drop, low, ctx.factor = lora_linear(flat, weight, bias, weight_a, weight_b, p, scaling)
        ctx.save_for_backward(flat, drop, low, weight, weight_a, weight_b)
        return result.view(*x.shape[:-1], result.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, drop, low, weight, weight_a, weight_b = ctx.saved_tensors
        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])
        needs = (needs_x, needs_a, needs_b)
        grad_x, grad_a, grad_b = lora_linear_backward(g, flat, drop, low, weight, weight_a, weight_b, ctx.factor, needs)
        if grad_x is not None:
            grad_x = grad_x.view(grad.shape[:-1] + (flat.shape[-1],))
        return grad_x, None, None, grad_a, grad_b, None, None


def _plain_linear(layer) -> bool:
    return type(layer) is nn.Linear


def fast_path_applies(module, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """True where fast_lora_forward computes exactly PEFT's function (see the module's doc)."""
    if not module.training or args or kwargs or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return False
    base, lora_a, lora_b = module.base_layer, module.lora_A[name], module.lora_B[name]
    if not (_plain_linear(base) and _plain_linear(lora_a) and _plain_linear(lora_b)):
        return False
    if lora_a.bias is not None or lora_b.bias is not None:
        return False
    if not isinstance(module.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return False
    return x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype


def lora_parts(module) -> tuple:
    """(base layer, A, B, dropout p, scaling) of a LoRA Linear where fast_path_applies."""
    name = module.active_adapters[0]
    dropout = module.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    return module.base_layer, module.lora_A[name].weight, module.lora_B[name].weight, p, float(module.scaling[name])


def frozen(base) -> bool:
    """True where neither the base layer's weight nor its bias trains (LoRA's case)."""
    return not (base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad))


def fast_lora_forward(module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """base(x) + lora_B(lora_A(dropout(x))) * scaling, as PEFT's Linear.forward computes it."""
    if not fast_path_applies(module, x, args, kwargs):
        return type(module).forward(module, x, *args, **kwargs)
    base, weight_a, weight_b, p, scaling = lora_parts(module)
    if frozen(base):
        return FrozenBaseLoraLinear.apply(x, base.weight, base.bias, weight_a, weight_b, p, scaling)
    # a trained base layer: autograd over the same computation
    out = lora_linear(x.reshape(-1, x.shape[-1]), base.weight, base.bias, weight_a, weight_b, p, scaling)[0]
    return out.view(*x.shape[:-1], out.shape[-1])


def use_fast_lora_forward(model) -> int:
    """Give every plain PEFT LoRA Linear of `model` the fast training forward; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(fast_lora_forward, module)
            count += 1
    return count
