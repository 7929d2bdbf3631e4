"""The training methods: what each one reads from the config and what it produces.

One registry, read by the planner (which sections a stage keeps), the train
job (how the PEFT config is built, whether weights are loaded in 4 bits), the
merge job (adapter or full weights) and the report (which settings to show).
The method names users may write are the schema's `method` enum; the planner
checks once that every one of them is registered here. A new method is one
entry below (and, if it needs one, a config section in the schema).

Standard library only: the planner imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One way of training a stage."""

    name: str
    # Method-specific config sections this method reads (besides training and divergence);
    # the planner empties the others, so editing them re-runs nothing of this method.
    sections: tuple[str, ...]
    # "adapter": a PEFT adapter in {stage}/adapter/, merged into the base by the merge job;
    # "model": full weights in {stage}/model/, which the merge job links as they are.
    artifact: str
    # Base weights loaded through bitsandbytes (the `quantization` section).
    quantized: bool = False
    # peft class that builds the adapter config from `peft_section` (None: no adapter).
    peft_config: str | None = None
    peft_section: str | None = None
    # The config gets the run's optimizer step count as `total_step` (AdaLoRA's rank schedule).
    needs_total_step: bool = False

    @property
    def adapter(self) -> bool:
        return self.artifact == "adapter"


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("full", sections=(), artifact="model"),
        Method("lora", sections=("lora",), artifact="adapter", peft_config="LoraConfig", peft_section="lora"),
        Method(
            "qlora",
            sections=("lora", "quantization"),
            artifact="adapter",
            quantized=True,
            peft_config="LoraConfig",
            peft_section="lora",
        ),
        Method(
            "adalora",
            sections=("adalora",),
            artifact="adapter",
            peft_config="AdaLoraConfig",
            peft_section="adalora",
            needs_total_step=True,
        ),
    )
}
# Every section some method reads; a stage keeps only its own method's.
METHOD_SECTIONS = tuple(sorted({s for m in METHODS.values() for s in m.sections}))


def method(name: str) -> Method:
    """The registered method `name` (the planner has already rejected unknown names)."""
    return METHODS[name]
