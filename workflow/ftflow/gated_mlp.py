"""A training forward for gated (SwiGLU) MLPs on the CPU that keeps half the MLP's activations for backward.

Llama-family MLPs compute `down(silu(gate(x)) * up(x))`. Autograd keeps four
tensors of the MLP's inner width per token for backward: gate's output and
silu's (for the product's gradients and silu's own), up's output, and the
product (down's input, for down's weight or adapter gradient). On the embedded
default's lora-r16 job those are 600 of the 1,157 MB a step keeps (counted with
`torch.autograd.graph.saved_tensors_hooks`).

`lean_mlp_forward` runs `silu(g) * u` and `down` as one autograd function that
keeps only g and u (and, for a LoRA `down`, its one-byte dropout mask and
rank-r activations); backward recomputes silu(g) and the product, two
element-wise passes over tensors that the gradient passes read anyway.

`down` may be a plain `nn.Linear` (full fine-tuning, or an MLP whose down
projection has no adapter) or one of PEFT's plain LoRA Linears where
ftflow.lora_forward's fast path applies, with a frozen base. It is used only in
training mode, on CPU tensors, without autocast, where the activation is SiLU;
everything else runs the model's own forward.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
from torch import nn
from torch.nn import functional as F

from .lora_forward import fast_path_applies, frozen, lora_linear, lora_linear_backward, lora_parts

# MLP classes whose forward is down(act_fn(gate(x)) * up(x)); `gated_forward` checks each one's source
GATED_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP", "GraniteMLP"})
GATED_FORWARD = "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\nreturn down_proj"


@functools.cache
def gated_forward(cls) -> bool:
    """True where `cls.forward` is, statement for statement, the gated MLP this module replaces."""
    try:
        lines = inspect.getsource(cls.forward).splitlines()[1:]
    except (OSError, TypeError):
        return False
    body = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return "\n".join(body) == GATED_FORWARD


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


class SwiGLUDown(torch.autograd.Function):
    """`down(silu(g) * u)`, down = `h @ W.T + bias [+ (mask * h) @ A.T @ B.T * factor]`, keeping g and u."""

    @staticmethod
    def forward(ctx, g, u, weight, bias, weight_a, weight_b, p: float, scaling: float):
        g2, u2 = g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])
        h = F.silu(g2).mul_(u2)
        drop, low, ctx.factor = None, None, 0.0
        if weight_a is None:
            result = F.linear(h, weight, bias)
        else:  # h is ours: its dropped elements are zeroed in place
            result, drop, low, ctx.factor = lora_linear(h, weight, bias, weight_a, weight_b, p, scaling, scratch=True)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(g2, u2, drop, low, weight, weight_a, weight_b)
        return result.view(*g.shape[:-1], result.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        g, u, drop, low, weight, weight_a, weight_b = ctx.saved_tensors
        needs_g, needs_u, needs_w, needs_bias, needs_a, needs_b = ctx.needs_input_grad[:6]
        out = grad.reshape(-1, grad.shape[-1])
        silu = F.silu(g)
        needs_h = needs_g or needs_u
        grad_g = grad_u = grad_w = grad_bias = grad_a = grad_b = None
        h = silu * u if needs_w or (weight_a is not None and needs_a) else None
        if needs_w:
            grad_w = out.t() @ h
        if needs_bias and ctx.has_bias:
            grad_bias = out.sum(0)
        if weight_a is not None:
            needs = (needs_h, needs_a, needs_b)
            grad_h, grad_a, grad_b = lora_linear_backward(
                out, h, drop, low, weight, weight_a, weight_b, ctx.factor, needs, scratch=True
            )
        else:
            grad_h = out @ weight if needs_h else None
        if needs_u:
            grad_u = grad_h * silu
        if needs_g:
            grad_g = torch.ops.aten.silu_backward(grad_h.mul_(u), g)
        shape = grad.shape[:-1] + (g.shape[-1],)
        return (
            None if grad_g is None else grad_g.view(shape),
            None if grad_u is None else grad_u.view(shape),
            grad_w,
            grad_bias,
            grad_a,
            grad_b,
            None,
            None,
        )


def _down_parts(down, probe: torch.Tensor):
    """(weight, bias, A, B, p, scaling) of `down` for SwiGLUDown, or None where it does not apply."""
    if type(down) is nn.Linear:
        return down.weight, down.bias, None, None, 0.0, 1.0
    if not hasattr(down, "lora_A") or not fast_path_applies(down, probe, (), {}):
        return None
    base, weight_a, weight_b, p, scaling = lora_parts(down)
    return (base.weight, base.bias, weight_a, weight_b, p, scaling) if frozen(base) else None


def lean_mlp_forward(module, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), as the model's MLP computes it, through SwiGLUDown where it applies."""
    if not module.training or x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or not _is_silu(module.act_fn):
        return type(module).forward(module, x)
    g = module.gate_proj(x)
    u = module.up_proj(x)
    parts = _down_parts(module.down_proj, g)
    if parts is None or g.dtype != parts[0].dtype or u.dtype != g.dtype:
        return module.down_proj(module.act_fn(g) * u)
    return SwiGLUDown.apply(g, u, *parts)


def use_lean_mlp_forward(model) -> int:
    """Give every gated MLP of `model` (GATED_MLP_CLASSES) the lean training forward; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in GATED_MLP_CLASSES and gated_forward(type(module)):
            module.forward = types.MethodType(lean_mlp_forward, module)
            count += 1
    return count
