"""Greedy decoding of a batch of prompts, as evaluation runs it: the shared prefix once, rows retired as they end.

transformers' generate() prefills every prompt whole and runs every row of a
batch until its longest answer ends. For greedy decoding of a model whose
layers all attend to the whole sequence, ftflow decodes the batch itself:

  shared prefix   the tokens every prompt of the batch starts with (a chat
                  template's system prompt, a task's instructions) run once,
                  as one row, and their keys and values are copied to every row
  layout          [shared prefix][padding][the prompt's own tokens][answer]:
                  the padding sits between the prefix and each prompt's own
                  tokens and is masked out; position ids count real tokens only,
                  so each row sees the positions it would see alone
  retirement      a row that emits a stop token leaves the batch and the cache
                  at once; the others go on

The answers are generate()'s (tests compare with generate() one prompt at a
time). Sampling, other model families, models with sliding-window or other
non-global layers, and models whose generation_config asks generate() for
more than the argmax (a repetition penalty, banned words, beams: see
ANSWER_CHANGING) use generate().
"""

from __future__ import annotations

import inspect

import torch

from .packing import common_prefix_length

# Model families whose decoder layers and cache this decoder has been checked against.
FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})
# A shared prefix shorter than this is run with each prompt (one forward fewer).
MIN_SHARED_PREFIX = 4
# Settings a model's generation_config may carry that make generate()'s greedy answers other than
# the argmax at every step, with their neutral values: a model that sets one decodes with generate().
ANSWER_CHANGING = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": 0,
    "exponential_decay_length_penalty": None,
    "num_beams": 1,
    "penalty_alpha": None,
    "dola_layers": None,
    "guidance_scale": 1.0,
    "watermarking_config": None,
    "stop_strings": None,
}


def applies(model, spec: dict) -> bool:
    """Whether `model` and the eval section's decoding settings `spec` are decoded here (else generate())."""
    config = model.config
    # configs without layer_types (Mistral, Phi-3) apply `sliding_window` to every layer when it is set
    window = ["sliding_attention"] if getattr(config, "sliding_window", None) else ["full_attention"]
    layers = getattr(config, "layer_types", None) or window
    settings = getattr(model, "generation_config", None)
    return (
        not spec["do_sample"]
        and getattr(config, "model_type", None) in FAMILIES
        and not getattr(config, "is_encoder_decoder", False)
        and all(kind == "full_attention" for kind in layers)
        and all(getattr(settings, key, None) in (None, neutral) for key, neutral in ANSWER_CHANGING.items())
    )


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt has in common, leaving each at least one of its own (0 if few)."""
    # the last prompt token must run in the batch: it gives the logits
    n = common_prefix_length(prompts, min(len(p) for p in prompts) - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def _cache_argument(model) -> str:
    """The forward's keyword for the key/value cache (transformers 5.24 renamed past_key_values)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_batch(
    model, prompts: list[list[int]], max_new_tokens: int, stops: list[int], pad: int, device
) -> list[dict]:
    """Per prompt, in input order: {"ids": answer ids before the first stop token, "stopped": whether one came}."""
    from transformers import DynamicCache

    rows = len(prompts)
    cache = DynamicCache(config=model.config)
    step_kwargs = {_cache_argument(model): cache, "use_cache": True}
    prefix = shared_prefix(prompts)
    if prefix:
        head = torch.tensor([prompts[0][:prefix]], device=device)
        model(input_ids=head, position_ids=torch.arange(prefix, device=device)[None], logits_to_keep=1, **step_kwargs)
        cache.batch_repeat_interleave(rows)

    own = [p[prefix:] for p in prompts]
    width = max(len(p) for p in own)
    ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros((rows, prefix + width), dtype=torch.long)
    mask[:, :prefix] = 1
    for row, tokens in enumerate(own):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, prefix + width - len(tokens) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix:]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, **step_kwargs).logits
    last = positions[:, -1]

    stop_set = set(stops)
    answers: list[list[int]] = [[] for _ in range(rows)]
    stopped = [False] * rows
    live = list(range(rows))  # the prompts still in the batch, in batch order
    for step in range(max_new_tokens):
        tokens = logits[:, -1].argmax(-1)
        keep = []
        for j, (row, token) in enumerate(zip(live, tokens.tolist())):
            if token in stop_set:
                stopped[row] = True
            else:
                answers[row].append(token)
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, last, tokens = mask[index], last[index], tokens[index]
            live = [live[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        last = last + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last[:, None], **step_kwargs).logits
    return [{"ids": answers[row], "stopped": stopped[row]} for row in range(rows)]
