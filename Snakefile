# ftflow: fine-tuning experiments as a file dependency graph.
#   tokenize -> train -> merge -> eval (+ harness) -> report, one wildcard per experiment and stage.
# The experiments live in config.yaml (or the files given with --configfile);
# every step runs the `ftflow` command line, all logic is in workflow/ftflow/.
import sys

from snakemake.utils import min_version

min_version("9.0")
sys.path.insert(0, f"{workflow.basedir}/workflow")
from ftflow.workflow import config_file_or_exit  # noqa: E402

# Snakemake says only "not valid JSON or YAML" for a broken config file: name its line first.
config_file_or_exit("config.yaml")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# config `container:` (a .sif or docker:// image); used with --use-apptainer.
container: CONTAINER


include: "workflow/rules/prepare.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/harness.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
