"""The planner: one YAML config of models, datasets, defaults, experiments, sweeps and searches, resolved once.

    loading   read and layer config files; duplicate keys caught
    schema    the JSON Schema: the first check, and the one source of defaults and enums
    checks    names, keys, allowed values, and the "did you mean" every message uses
    sweeps    sweeps expanded into named experiments
    searches  searches checked, their round specs, and their planned trials turned into experiments
    sections  training/lora/adalora/quantization/divergence/eval checks
    datasets  dataset checks, source fingerprints and the settings that make a data_id
    mixtures  a stage's dataset or list of datasets, and its mix settings
    stages    one stage resolved (defaults <- experiment <- stage) and checked
    resolve   build_plan -> Plan, the tokenization jobs, evaluations and baselines

Only torch-free leaves of ftflow are imported here, and no job module imports
this package: planning stays fast and the jobs read only the specs it writes.
"""

from ..errors import ConfigError
from .loading import check_duplicate_keys, load_workflow_config, load_yaml, normalize_raw
from .resolve import Plan, build_plan
from .schema import LORA_DEFAULTS, METRIC_OUTPUTS, METRICS, QUANTIZATION_DEFAULTS
from .sweeps import expand_sweeps

__all__ = [
    "ConfigError",
    "LORA_DEFAULTS",
    "METRICS",
    "METRIC_OUTPUTS",
    "Plan",
    "QUANTIZATION_DEFAULTS",
    "build_plan",
    "check_duplicate_keys",
    "expand_sweeps",
    "load_workflow_config",
    "load_yaml",
    "normalize_raw",
]
