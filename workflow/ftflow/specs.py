"""The resolved config: typed specs that the planner writes and every job reads back.

The planner (ftflow.config) resolves the YAML into these frozen dataclasses
and writes each experiment's `ExperimentSpec.to_json()` to
results/{experiment}/config.json; the jobs read it back with
`ExperimentSpec.read(path)`, so both sides speak the same typed contract and
never index string-keyed dicts. Standard library only: the planner imports it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import FtflowError
from .hashing import content_hash
from .methods import METHODS, Method

# Bump when the meaning of a resolved config changes. 2: a stage names its datasets, data_ids
# and mix (mixtures) instead of one dataset and data_id.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class ModelSpec:
    """A base model and where its weights come from (exactly one of hub, path, package).

    No field has a default here: the schema holds them, and the planner fills every field.
    """

    name: str
    hub: str | None  # Hugging Face hub id, e.g. Qwen/Qwen3-0.6B
    path: str | None  # local HF folder or .gguf file
    package: str | None  # installed Python package that ships a GGUF file
    file: str | None  # GGUF file name inside `package` (or beside `path`)
    revision: str | None  # hub revision (branch, tag or commit)
    trust_remote_code: bool  # run the model repo's own Python code (off unless set)
    dtype: str  # dtype the prepared weights are stored in
    arch: str | None  # architecture family, used for the smoke-mode stand-in
    chat_template: str | None  # Jinja chat template to install (text or file path)

    def source_text(self) -> str:
        if self.hub:
            return f"hub:{self.hub}" + (f"@{self.revision}" if self.revision else "")
        if self.package:
            return f"package:{self.package}/{self.file}"
        return f"path:{self.path}" + (f"/{self.file}" if self.file else "")


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: where rows come from, how they become tokens, how they are scored."""

    name: str
    source: Any  # "hub:<id>", "modelscope:<id>", "generator:<name>", a path/glob, or {split: path}
    text_split: str  # a .txt file's rows: line | paragraph | file
    kind: str  # text | instruction | chat
    subset: str | None  # hub config name
    revision: str | None  # hub revision
    hub_splits: dict | None  # {train: "train", validation: "validation", test: "test"}
    args: dict  # generator arguments
    template: str | None  # instruction: Python format string over columns
    prompt: str | None  # instruction: explicit prompt template
    completion: str | None  # instruction: explicit completion template
    text_column: str  # text kind: column holding the raw text
    messages_column: str | None  # chat kind: column holding the conversation (None: the format's own)
    loss_on: str | None  # completion | assistant | all (default by kind)
    chat_template: str | None  # override the tokenizer's chat template
    max_length: int  # tokens per example (text: block size)
    truncation: str  # drop | truncate rows longer than max_length
    splits: dict | None  # {validation: n|fraction, test: n|fraction, seed: int}
    metrics: tuple  # task metrics computed on generated outputs
    primary_metric: str | None  # metric that picks the best row of the report
    format: str  # chat kind: openai | sharegpt | alpaca (formats.py)
    columns: dict | None  # the format's columns other than the conversation's, resolved
    tags: dict | None  # sharegpt: the turn keys and role names, resolved; None for other formats
    roles_to_train: list  # roles whose turns carry labels, in the schema's order
    mask_history: bool  # label only the last trainable turn


@dataclass(frozen=True)
class DataSpec:
    """One tokenization job: a dataset, the tokenizer of one model, and caps."""

    data_id: str
    dataset: DatasetSpec
    model: str  # the model whose tokenizer is used
    tokenizer_source: str
    max_length: int
    row_caps: dict | None  # smoke mode: {train: n, validation: n, test: n}
    fingerprint: str  # content hash of the source files or generator args
    # Everything that changes the tokens, and nothing else: written as the tokenize
    # job's spec file and hashed into data_id (see tokenization_settings).
    settings: dict = field(default_factory=dict)


def concat_rows(train_rows: int, weight: float) -> int:
    """What a concat mixture's weight means: the rows taken from a member of `train_rows` rows,
    weight x rows rounded half up (the planner counts steps with it, the train job takes them)."""
    return int(math.floor(train_rows * weight + 0.5))


@dataclass(frozen=True)
class StageSpec:
    name: str
    index: int
    method: str
    datasets: tuple[str, ...]  # what the stage trains on, in config order; two or more are a mixture
    data_ids: tuple[str, ...]  # each member's tokenized data (results/data/{data_id}), in the same order
    mix: dict  # {} for one dataset; a mixture's {strategy, weights: {member: weight, every member}, seed}
    init_from: str  # merged | adapter
    max_length: int  # tokens per example (a mixture's members without a stage value keep theirs: the largest)
    packing: bool
    lora: dict
    adalora: dict
    quantization: dict
    training: dict
    divergence: dict
    gpus: int | None

    @property
    def method_info(self) -> Method:
        """The method's registry entry: its artifact, sections and PEFT config."""
        return METHODS[self.method]

    @property
    def is_mixture(self) -> bool:
        return len(self.datasets) > 1

    @property
    def data_text(self) -> str:
        """The stage's data as messages and the report name it: its dataset, or its mixture:
        `general-zh 0.2 + my-sft` (concat; a weight of 1 goes unwritten), `general-zh 0.2 | my-sft` (interleave)."""
        if not self.is_mixture:
            return self.datasets[0]
        weights = self.mix["weights"]
        parts = [name if weights[name] == 1 else f"{name} {weights[name]:g}" for name in self.datasets]
        return (" + " if self.mix["strategy"] == "concat" else " | ").join(parts)

    @property
    def data_id(self) -> str:
        """The tokenized data of a one-dataset stage; a mixture has one per member (data_ids)."""
        if self.is_mixture:
            raise FtflowError(f"stage {self.name!r} trains on a mixture of {len(self.datasets)} datasets: use data_ids")
        return self.data_ids[0]

    @classmethod
    def from_json(cls, data: dict) -> StageSpec:
        return cls(**{**data, "datasets": tuple(data["datasets"]), "data_ids": tuple(data["data_ids"])})


@dataclass(frozen=True)
class EvalSpec:
    dataset: str
    data_id: str
    split: str
    loss_split: str
    max_new_tokens: int
    batch_size: int
    do_sample: bool
    temperature: float
    top_p: float
    max_examples: int | None
    metrics: tuple
    primary_metric: str | None

    @classmethod
    def from_json(cls, data: dict) -> EvalSpec:
        return cls(**{**data, "metrics": tuple(data["metrics"])})


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    model: str
    stages: tuple[StageSpec, ...]
    eval: EvalSpec
    baseline: bool = False
    description: str = ""
    sweep: str | None = None
    sweep_params: dict = field(default_factory=dict)
    smoke: bool = False

    def to_json(self) -> dict:
        return _versioned(self)

    @classmethod
    def from_json(cls, data: dict) -> ExperimentSpec:
        """The spec back from its config.json (what every job reads)."""
        data = _unversioned(data, f"config.json of experiment {data.get('name')!r}")
        data["stages"] = tuple(StageSpec.from_json(stage) for stage in data["stages"])
        data["eval"] = EvalSpec.from_json(data["eval"])
        return cls(**data)

    @classmethod
    def read(cls, path: str) -> ExperimentSpec:
        with open(path, encoding="utf-8") as handle:
            return cls.from_json(json.load(handle))

    @property
    def config_hash(self) -> str:
        return content_hash(self.to_json())

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"experiment {self.name!r} has no stage {name!r}")

    def previous(self, stage: StageSpec) -> StageSpec | None:
        return self.stages[stage.index - 1] if stage.index > 0 else None


@dataclass(frozen=True)
class HarnessSpec:
    """The lm-evaluation-harness benchmarks of one experiment: written beside its config.json
    (results/{experiment}/harness-config.json), apart from it, so that editing them re-runs
    only the harness jobs."""

    experiment: str
    model: str
    baseline: bool
    tasks: tuple[str, ...]  # task or group names, and local task YAML paths (relative to the working directory)
    files: dict  # {path: sha256} of the local task YAMLs and every file they read: editing one re-runs the job
    num_fewshot: int | None
    limit: int | None  # examples per task, after smoke mode's cap
    batch_size: int
    apply_chat_template: bool
    stages: tuple[str, ...]  # the earlier stages benchmarked too (eval.harness.every_stage), in order
    config_hash: str  # the experiment's config hash: the model the benchmarks ran on
    smoke: bool = False

    def to_json(self) -> dict:
        return _versioned(self)

    @classmethod
    def read(cls, path: str) -> HarnessSpec:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        data = _unversioned(data, f"harness-config.json of experiment {data.get('experiment')!r}")
        return cls(**{**data, "tasks": tuple(data["tasks"]), "stages": tuple(data["stages"])})

    @property
    def harness_hash(self) -> str:
        return content_hash(self.to_json())

    @staticmethod
    def is_local_task(task: str) -> bool:
        """A local task YAML file (a path), not a harness task or group name."""
        return task.endswith((".yaml", ".yml"))


def _versioned(spec) -> dict:
    """A spec as the JSON a job reads, stamped with the format it was written in."""
    data = asdict(spec)
    data["format_version"] = FORMAT_VERSION
    return data


def _unversioned(data: dict, what: str) -> dict:
    """`data` without its format_version; a file written by another format is an error naming it."""
    data = dict(data)
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise FtflowError(
            f"{what} has format_version {version!r}, this ftflow writes {FORMAT_VERSION}: re-run snakemake to rewrite it"
        )
    return data
