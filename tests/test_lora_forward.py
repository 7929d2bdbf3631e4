"""ftflow.lora_forward: the CPU training forward of plain LoRA layers computes PEFT's function.

Without dropout the output and every gradient equal PEFT's own forward; with
dropout they equal base(x) + scaling * lora_B(lora_A(mask * x)) for the mask the
fast path drew, and that mask drops p of the elements. Whatever the fast path
does not cover (eval mode, DoRA, a merged adapter, several adapters) runs PEFT's
forward, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from ftflow.lora_forward import drop_mask, fast_path_applies, use_fast_lora_forward
from helpers import tiny_llama


def scaled_dropout(x: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    """`scale * dropout(x, p)` with drop_mask's mask (the same draws): what the fast path multiplies by lora_A."""
    drop, kept = drop_mask(x, p)
    if drop is None:
        return x * scale
    if kept == 0.0:
        return torch.zeros_like(x)
    return x.masked_fill(drop, 0.0) * (scale / kept)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def lora_model(dropout: float, fast: bool, **extra):
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=6, lora_dropout=dropout, target_modules=["up", "down"], init_lora_weights=False, **extra
    )
    model = get_peft_model(TwoLayers(), config)  # scaling 1.5: not a power of two
    if fast:
        assert use_fast_lora_forward(model) == 2
    return model.train()


def output_and_grads(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24)])
def test_without_dropout_output_and_gradients_equal_peft(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    theirs = output_and_grads(lora_model(0.0, fast=False), x)
    ours = output_and_grads(lora_model(0.0, fast=True), x)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-6)
    assert ours[2].keys() == theirs[2].keys() and len(ours[2]) == 4  # A and B of both layers
    for name in theirs[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], rtol=1e-5, atol=1e-6)


def test_with_dropout_it_is_the_lora_function_of_the_mask_it_drew():
    model = lora_model(0.3, fast=True)
    layer = model.base_model.model.up
    x = torch.randn(3, 6, 24, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)  # the same draws: the dropped input the fast path multiplied by lora_A
    dropped = scaled_dropout(x.detach(), 0.3, layer.scaling["default"])
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + (dropped @ a.T) @ b.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # gradients flow to x through the base layer and the kept elements only
    out.sum().backward()
    mask = (dropped != 0).float() * layer.scaling["default"] / (1 - round(0.3 * 32768) / 32768)
    grad_x = torch.ones_like(out) @ layer.base_layer.weight + ((torch.ones_like(out) @ b) @ a) * mask
    torch.testing.assert_close(x.grad, grad_x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_scaled_dropout_drops_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    y = scaled_dropout(x, p, 2.0)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.002, dropped  # 1M draws: the standard error is below 0.0005
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 2.0 / (1 - round(p * 32768) / 32768)))
    assert abs(y.mean().item() - 2.0) < 0.01
    # every one of the four 16-bit words of a draw drops p: no word is biased
    words = (y == 0).float().view(-1, 4).mean(0)
    assert (words - p).abs().max().item() < 0.004, words


def test_scaled_dropout_is_reproducible_from_the_seed_and_varies_without_it():
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    first = scaled_dropout(x, 0.2, 1.0)
    torch.manual_seed(3)
    assert torch.equal(first, scaled_dropout(x, 0.2, 1.0))
    assert not torch.equal(first, scaled_dropout(x, 0.2, 1.0))


def test_what_the_fast_path_does_not_cover_runs_pefts_forward():
    x = torch.randn(4, 24)
    # eval mode: bit for bit PEFT's output
    ours, theirs = lora_model(0.1, fast=True).eval(), lora_model(0.1, fast=False).eval()
    assert torch.equal(ours(x), theirs(x))
    layer = ours.base_model.model.up
    assert not fast_path_applies(layer, x, (), {})
    # DoRA, a merged adapter, no active adapter: PEFT's forward
    dora = lora_model(0.0, fast=True, use_dora=True)
    assert not fast_path_applies(dora.base_model.model.up, x, (), {})
    assert torch.equal(dora(x), lora_model(0.0, fast=False, use_dora=True)(x))
    merged = lora_model(0.0, fast=True)
    merged.base_model.model.up.merge()
    assert not fast_path_applies(merged.base_model.model.up, x, (), {})
    with merged.disable_adapter():
        assert not fast_path_applies(merged.base_model.model.down, x, (), {})


def test_a_causal_lm_trains_the_same_with_activation_checkpointing():
    """Checkpointing re-runs the forward in backward: the re-drawn masks must be the first ones."""

    def grads(checkpointing: bool):
        model = tiny_llama("sdpa", use_cache=False)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear")
        model = get_peft_model(model, config)
        assert use_fast_lora_forward(model) == 2 * 7  # q k v o gate up down in each of 2 layers
        for name, p in model.named_parameters():  # B = 0 at init: give the adapters an effect
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(4))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(11)
        ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_a_trained_base_layer_gets_pefts_gradients_too():
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(3))
    results = []
    for fast in (False, True):
        model = lora_model(0.0, fast=fast)
        model.base_model.model.up.base_layer.weight.requires_grad_(True)
        results.append(output_and_grads(model, x))
    theirs, ours = results
    assert "base_model.model.up.base_layer.weight" in ours[2]
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-6)
    for name in theirs[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], rtol=1e-5, atol=1e-6)


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct activation storages (not weights) autograd keeps for backward over one forward."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(storages.values())


def test_the_fast_path_keeps_far_less_for_backward_than_pefts_forward():
    def model(fast: bool):
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
        peft_model = get_peft_model(tiny_llama("sdpa", use_cache=False), config)
        if fast:
            use_fast_lora_forward(peft_model)
        return peft_model.train()

    ids = torch.randint(0, 101, (2, 64), generator=torch.Generator().manual_seed(0))
    theirs, ours = saved_bytes(model(False), ids), saved_bytes(model(True), ids)
    print(f"saved for backward: PEFT {theirs} bytes, ftflow {ours} bytes")
    assert ours < 0.75 * theirs, (ours, theirs)
