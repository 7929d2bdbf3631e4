"""Batches: padding-free (several examples in one row, and attention that keeps them apart) or padded.

The collator is transformers' `DataCollatorWithFlattening`: it concatenates a
batch into one row, restarts position ids at every example, masks the first
label of each example and returns `cu_seq_lens_*` boundaries.

With `attn_implementation="sdpa"`, transformers turns restarting position ids
into a block-diagonal mask; the kernel still computes the whole (L x L) score
matrix, so eight 150-token examples cost as much attention as one 1200-token
one. `ftflow_packed` runs SDPA once per example instead (a variable-length
attention for devices without flash-attention), and falls back to plain SDPA
for everything else (generation, padded batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

PACKED_ATTENTION = "ftflow_packed"


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA per packed example, split at `cu_seq_lens_q`; otherwise plain SDPA."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"packed attention: cu_seq_lens_q {bounds} does not span the row of {query.shape[2]} tokens")
    # split (not slice): its backward concatenates the examples' gradients once, where each slice's backward
    # would fill a zero tensor of the whole row
    sizes = [end - start for start, end in zip(bounds, bounds[1:])]
    outputs = []
    for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2)):
        if q.shape[2] == 0:
            continue
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout if module.training else 0.0,
            is_causal=True,
            scale=scaling,
            enable_gqa=groups > 1,
        )
        outputs.append(out.transpose(1, 2))
    # transformers' attention functions return (batch, seq, heads, head_dim): one copy, by the cat
    return (torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0].contiguous()), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def packing_collator():
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=True)


def padding_collator(tokenizer):
    """The `packing: false` batches: rows padded to the longest (a multiple of 8), pads unlabelled."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)


def pick_attention(device_type: str) -> str:
    """flash-attention 2 where installed on CUDA, else ftflow's per-example SDPA."""
    if device_type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return PACKED_ATTENTION
