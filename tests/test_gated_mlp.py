"""ftflow.gated_mlp: the lean SwiGLU training forward computes the model's own function and gradients.

Full fine-tuning, LoRA on every linear layer (with dropout: the same masks as
ftflow.lora_forward alone, drawn in the same order), and LoRA that leaves the
down projection alone all train to the same loss and gradients; the MLP keeps
less for backward; eval mode and other activations run the model's forward.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from ftflow.gated_mlp import use_lean_mlp_forward
from ftflow.lora_forward import use_fast_lora_forward
from helpers import tiny_llama
from test_lora_forward import saved_bytes

IDS = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))


def build(lean: bool, lora: dict | None, checkpointing: bool = False, reentrant: bool = False):
    model = tiny_llama("sdpa", use_cache=False)
    if lora is not None:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **lora))
        use_fast_lora_forward(model)
        for name, p in model.named_parameters():  # B = 0 at init: give the adapters an effect
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(4))
    if lean:
        assert use_lean_mlp_forward(model) == 2
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()  # as ftflow.model_setup does with a frozen base
    return model.train()


def loss_and_grads(model):
    torch.manual_seed(11)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


CASES = {
    "full": None,
    "lora-all-dropout": {"lora_dropout": 0.2, "target_modules": "all-linear"},
    "lora-all": {"lora_dropout": 0.0, "target_modules": "all-linear"},
    "lora-attention-only": {"lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_every_gradient_equal_the_models_own_forward(case):
    theirs_loss, theirs = loss_and_grads(build(False, CASES[case]))
    ours_loss, ours = loss_and_grads(build(True, CASES[case]))
    assert ours_loss == pytest.approx(theirs_loss, rel=1e-6)
    assert ours.keys() == theirs.keys() and ours
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(reentrant):
    lora = CASES["lora-all-dropout"]
    plain = loss_and_grads(build(True, lora))
    checkpointed = loss_and_grads(build(True, lora, checkpointing=True, reentrant=reentrant))
    assert checkpointed[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(checkpointed[1][name], plain[1][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["full", "lora-all-dropout"])
def test_the_mlp_keeps_less_for_backward(case):
    ids = torch.randint(0, 101, (2, 64), generator=torch.Generator().manual_seed(0))
    theirs, ours = saved_bytes(build(False, CASES[case]), ids), saved_bytes(build(True, CASES[case]), ids)
    print(f"{case}: saved for backward {theirs} bytes, lean MLP {ours} bytes")
    assert ours < 0.9 * theirs, (ours, theirs)


def test_eval_mode_and_other_activations_run_the_models_forward():
    ours, theirs = build(True, CASES["lora-all-dropout"]).eval(), build(False, CASES["lora-all-dropout"]).eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)
    gelu = build(True, None)
    for layer in gelu.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    reference = build(False, None)
    for layer in reference.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    assert loss_and_grads(gelu)[0] == loss_and_grads(reference)[0]


def test_a_class_whose_forward_is_not_the_gated_mlp_is_left_alone():
    from transformers.models.llama.modeling_llama import LlamaMLP

    from ftflow.gated_mlp import gated_forward

    assert gated_forward(LlamaMLP)

    class LlamaMLP2(LlamaMLP):  # a future version that scales the product
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0.5)

    LlamaMLP2.__name__ = "LlamaMLP"
    assert not gated_forward(LlamaMLP2)
    model = tiny_llama("sdpa", use_cache=False)
    for layer in model.model.layers:
        layer.mlp.__class__ = LlamaMLP2
    assert use_lean_mlp_forward(model) == 0
