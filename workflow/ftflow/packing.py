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

Shared prefix (`shared_prefix_row`, evaluation's loss): examples that start
with the same tokens (a chat template's system prompt, a task's
instructions), none of which is a label or predicts one, can be packed as
[prefix][example 1's own tokens][example 2's own tokens]...: the prefix runs
once, each example's own tokens attend to it and to themselves, and their
position ids continue from it, so every example computes what it would alone.
The forward gets the prefix length as `ftflow_shared_prefix`; only
`ftflow_packed` attention reads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .encoding import IGNORE

PACKED_ATTENTION = "ftflow_packed"
SHARED_PREFIX = "ftflow_shared_prefix"  # forward keyword: the packed row's first segment is every example's prefix
# A common prefix shorter than this is packed with each example (the usual row).
MIN_SHARED_PREFIX = 8


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
    prefix = int(kwargs.get(SHARED_PREFIX) or 0)
    if prefix and sizes[0] != prefix:
        raise ValueError(f"packed attention: shared prefix of {prefix} tokens but a first segment of {sizes[0]}")
    keys, values = key.split(sizes, dim=2), value.split(sizes, dim=2)
    outputs = []
    for index, (q, k, v) in enumerate(zip(query.split(sizes, dim=2), keys, values)):
        if q.shape[2] == 0:
            continue
        mask = None
        if prefix and index:  # an example's own tokens: they see the shared prefix and, causally, themselves
            k, v = torch.cat([keys[0], k], dim=2), torch.cat([values[0], v], dim=2)
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=prefix)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout if module.training else 0.0,
            is_causal=mask is None,
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


def shared_prefix_length(examples: list[dict]) -> int:
    """How many leading tokens every example shares with no label among them or right after them.

    A label at position i is predicted from position i-1, so the prefix [0, n)
    must leave labels[0..n] all unlabelled: then no logit of the prefix is ever
    scored, and each example keeps at least one token of its own. 0 when
    fewer than MIN_SHARED_PREFIX tokens qualify, or for a single example.
    """
    if len(examples) < 2:
        return 0
    limit = min(len(e["input_ids"]) for e in examples) - 1
    for example in examples:
        labels = example["labels"]
        first_label = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
        limit = min(limit, first_label - 1)
    n = common_prefix_length([e["input_ids"] for e in examples], limit)
    return n if n >= MIN_SHARED_PREFIX else 0


def common_prefix_length(sequences: list, limit: int) -> int:
    """How many leading tokens all `sequences` have in common, at most `limit`."""
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return n


def shared_prefix_row(examples: list[dict]) -> dict | None:
    """`examples` as one packed row with their shared prefix once (see the module docstring); None without one.

    Only for a model with `ftflow_packed` attention: any other reads the row as
    unrelated sequences, and the examples would not see the prefix.
    """
    prefix = shared_prefix_length(examples)
    if not prefix:
        return None
    ids = list(examples[0]["input_ids"][:prefix])
    labels = [IGNORE] * prefix
    positions = list(range(prefix))
    bounds = [0, prefix]
    for example in examples:
        own = list(example["input_ids"][prefix:])
        ids += own
        labels += list(example["labels"][prefix:])  # its first is unlabelled (shared_prefix_length)
        positions += range(prefix, prefix + len(own))
        bounds.append(bounds[-1] + len(own))
    cu_seq_lens = torch.tensor(bounds, dtype=torch.int32)
    longest = max(end - start for start, end in zip(bounds[1:], bounds[2:]))
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max(longest, prefix),
        "max_length_k": prefix + longest,
        SHARED_PREFIX: prefix,
    }


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
