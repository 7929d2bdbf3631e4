"""The `ftflow` command line: one subcommand per workflow step, plus `resolve` and `bench`.

    resolve         print the experiments a config resolves to (the planner, no job)
    prepare-model   tokenize   train   merge   evaluate   harness   report     one per rule
    bench           ftflow against the plain Hugging Face recipe (make bench)

Rules call these commands, so the same step runs on the host, in a container
and on a cluster node. Errors a user can fix print one line,
`ftflow: error: ...`, and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .errors import FtflowError


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(max(1, n))


def cmd_resolve(args) -> int:
    import yaml

    from .config import build_plan, load_workflow_config
    from .config.loading import yaml_syntax_error

    overrides = {}
    for item in args.config or []:
        key, _, value = item.partition("=")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise yaml_syntax_error(f"--config {key}", err) from None
    raw = load_workflow_config(args.configfile or ["config.yaml"], overrides)
    started = time.perf_counter()
    plan = build_plan(raw, workdir=os.getcwd(), results=args.results)
    seconds = time.perf_counter() - started
    rows = plan.summary()
    if args.json:
        json.dump({"experiments": rows, "data": sorted(plan.data), "seconds": seconds}, sys.stdout, indent=2)
        print()
        return 0
    width = max(len(r["experiment"]) for r in rows)
    for r in rows:
        stages = " > ".join(f"{s['name']}:{s['method']}[{s['data']}]" for s in r["stages"]) or "(untuned baseline)"
        print(f"{r['experiment']:<{width}}  {r['config_hash']}  {r['model']}  {stages}")
    print(f"{len(rows)} experiments, {len(plan.data)} tokenization jobs, resolved in {seconds:.3f} s", file=sys.stderr)
    return 0


def cmd_prepare_model(args) -> int:
    from .prepare import prepare_model

    _threads(args.threads)
    meta = prepare_model(args.spec, args.out)
    logging.info("prepared %s from %s", args.out, meta["source"])
    return 0


def cmd_tokenize(args) -> int:
    from .data import tokenize

    _threads(args.threads)
    stats = tokenize(args.spec, args.out, workdir=os.getcwd(), num_proc=args.threads or 1)
    for split, s in stats["splits"].items():
        logging.info(
            "%s: %d rows in, %d kept, dropped %s, %d tokens, %d label tokens",
            split,
            s["rows_in"],
            s["kept"],
            s["dropped"] or "none",
            s["tokens"],
            s["label_tokens"],
        )
    return 0


def _job_gpus(gpus: int | None, who: str):
    """Hold the job's GPU slots (gpu_slots.py) when the rule passed --gpus; otherwise change nothing."""
    import contextlib

    from .gpu_slots import gpus_for_job

    return contextlib.nullcontext() if gpus is None else gpus_for_job(gpus, who)


def _or_recorded_failure(args, what: str, run, record) -> int:
    """Run a job step. For a search trial's job (--record-failure) an error is the step's result: `record`
    writes it as the step's output (status failed and the error's line, through the same files a diverged
    run writes), the job succeeds and the trial's round goes on. Every other job fails as usual."""
    if not getattr(args, "record_failure", False):
        return run()
    try:
        return run()
    except Exception as err:  # any error of a trial is its outcome; a kill (a signal) is not and stays incomplete
        from .errors import error_line

        reason = error_line(err)
        logging.exception("%s failed; recorded as this search trial's outcome: %s", what, reason)
        record(reason)
        return 0


def _train_stage(args):
    """A train job's experiment and its stage `--stage` (None for a wrong name: train_stage names it)."""
    from .specs import ExperimentSpec

    experiment = ExperimentSpec.read(args.config)
    return experiment, next((s for s in experiment.stages if s.name == args.stage), None)


def _needs_bitsandbytes(stage) -> bool:
    from .optional_imports import uses_bitsandbytes

    return uses_bitsandbytes(stage.method_info.quantized, stage.training.get("optim"))


def cmd_train(args) -> int:
    from . import launch
    from .optional_imports import hide_bitsandbytes

    experiment, stage = _train_stage(args)
    if stage is not None and not _needs_bitsandbytes(stage):
        hide_bitsandbytes()  # before peft and transformers are imported: they import it when they find it
    if launch.is_data_parallel_worker():
        return _train(args)  # torchrun's workers: the launcher already holds the slots and records a failure

    def record(reason: str) -> None:
        from .train import write_failed_metrics

        write_failed_metrics(args.config, args.stage, args.out, reason)

    if args.gpus is None:
        return _or_recorded_failure(args, "training", lambda: _train(args), record)
    who = f"experiment {experiment.name!r}, stage {args.stage!r} (gpus: {args.gpus})"
    with _job_gpus(args.gpus, who) as slots:
        if args.gpus > 1:
            return _or_recorded_failure(args, "training", lambda: _data_parallel(args, slots), record)
        return _or_recorded_failure(args, "training", lambda: _train(args), record)


def _train(args) -> int:
    from .train import train_stage

    _threads(args.threads)
    result = train_stage(args.config, args.stage, args.base, args.data, args.out, adapter_dir=args.adapter)
    logging.info("stage %s: status %s, %s steps", args.stage, result["status"], result.get("steps"))
    return 0


def _data_parallel(args, slots) -> int:
    from . import launch

    status = launch.run_data_parallel(args.gpus, args.argv, slots)
    if status > 0 and args.record_failure:  # a negative status is a kill: no outcome to record
        raise FtflowError(f"data-parallel training exited with status {status} (the workers' errors are above)")
    return status


def cmd_merge(args) -> int:
    from .atomic import read_json
    from .optional_imports import hide_bitsandbytes

    hide_bitsandbytes()  # a QLoRA adapter is merged onto the base loaded unquantized
    from .merge import merge_stage, write_failed_merge

    _threads(args.threads)
    metrics = read_json(args.metrics)

    def merge() -> int:
        logging.info("merge: %s", merge_stage(args.metrics, args.base, args.out))
        return 0

    with _job_gpus(args.gpus, f"experiment {metrics['experiment']!r}, stage {metrics['stage']!r} merge"):
        return _or_recorded_failure(args, "merge", merge, lambda reason: write_failed_merge(args.out, reason))


def cmd_evaluate(args) -> int:
    from .optional_imports import hide_bitsandbytes

    hide_bitsandbytes()  # evaluation loads merged (unquantized) models only
    from .evaluation import evaluate_experiment, write_failed_eval
    from .specs import ExperimentSpec

    _threads(args.threads)

    def evaluate() -> int:
        result = evaluate_experiment(args.config, args.model, args.data, args.out)
        keys = ("status", "eval_loss", "perplexity", "metrics", "primary_value")
        logging.info("eval: %s", json.dumps({k: v for k, v in result.items() if k in keys}, default=str)[:2000])
        return 0

    with _job_gpus(args.gpus, f"experiment {ExperimentSpec.read(args.config).name!r}, eval"):
        return _or_recorded_failure(
            args, "evaluation", evaluate, lambda reason: write_failed_eval(args.config, args.out, reason)
        )


def cmd_harness(args) -> int:
    from .harness import run_harness
    from .specs import HarnessSpec

    _threads(args.threads)
    spec = HarnessSpec.read(args.spec)
    stage = f", after stage {args.stage!r}" if args.stage else ""
    with _job_gpus(args.gpus, f"experiment {spec.experiment!r}, harness{stage}"):
        result = run_harness(args.spec, args.model, args.out, stage=args.stage)
    for task, values in result["tasks"].items():
        main = values["main"]
        logging.info(
            "harness %s: %s %s (%s examples)", task, main, values["metrics"][main]["value"], values["examples"]
        )
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    experiments = args.experiments
    if args.experiments_file:
        with open(args.experiments_file, encoding="utf-8") as handle:
            experiments = json.load(handle)
    results = args.results or os.path.dirname(os.path.abspath(args.out))
    result = write_report(results, args.logs, experiments, args.out, title=args.title, searches=args.searches)
    logging.info("report: %d rows, best %s by %s", result["rows"], result["best"], result["primary"])
    return 0


def cmd_search_plan(args) -> int:
    from .search import plan_round

    doc = plan_round(args.spec, args.previous, args.out)
    logging.info("search %s round %d: %d trials (%s)", doc["search"], doc["round"], len(doc["trials"]), doc["kind"])
    return 0


def cmd_search_tell(args) -> int:
    from .search import tell_round

    # results/search/{search}/round-{k}.trials.json -> results
    results = args.results or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(args.trials))))
    doc = tell_round(args.spec, args.trials, args.experiments, results, args.previous, args.out)
    states = [t["state"] for t in doc["trials"]]
    logging.info("search %s round %d: %s", doc["search"], doc["round"], {s: states.count(s) for s in set(states)})
    return 0


def cmd_search_best(args) -> int:
    from .search import finish_search

    summary = finish_search(args.spec, args.rounds, args.best, args.study)
    logging.info("search %s: best %s", summary["search"], summary["best"])
    return 0


def cmd_bench(args) -> int:
    from .bench.inputs import default_configfile
    from .bench.runner import run_bench, run_peers_only

    command = "ftflow bench" + (" --quick" if args.quick else "") + (" --gpu" if args.gpu else "")
    work = args.work or os.path.join(args.out, "work")
    if args.only == "peers":
        configfile = args.configfile or default_configfile()
        cores = args.cores or os.cpu_count() or 1
        command += " --only peers" + "".join(
            f" --peer-{name} {value}"
            for name, value in (("steps", args.peer_steps), ("rounds", args.peer_rounds))
            if value
        )
        run_peers_only(
            args.out, work, configfile, args.quick, cores, command, args.peer_steps, args.peer_rounds, log=logging.info
        )
        logging.info("bench: wrote the peer comparison into %s/results.json and results.md", args.out)
        return 0
    results = run_bench(
        args.out,
        work,
        args.configfile or default_configfile(),
        args.quick,
        args.gpu,
        args.cores or os.cpu_count() or 1,
        command + (" --keep-peers" if args.keep_peers else ""),
        log=logging.info,
        keep_peers=args.keep_peers,
    )
    missed = [t["key"] for t in results["targets"] if not t["met"]]
    logging.info(
        "bench: wrote %s/results.json and results.md in %.0f s; targets missed: %s",
        args.out,
        results["seconds"],
        ", ".join(missed) or "none",
    )
    return 0


def _add_record_failure(p) -> None:
    p.add_argument(
        "--record-failure",
        action="store_true",
        help="a search trial's job: record an error as the step's outcome (status failed) instead of failing the job",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftflow", description="Fine-tuning experiments as a Snakemake workflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("resolve", help="print the resolved experiments of a config")
    p.add_argument("--configfile", nargs="+", help="config files, merged in order (default: config.yaml)")
    p.add_argument("--config", nargs="+", metavar="KEY=VALUE", help="top-level overrides, as snakemake --config")
    p.add_argument("--results", default="results")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("prepare-model", help="write a base model as an HF safetensors folder")
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("tokenize", help="tokenize one dataset with one tokenizer")
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("train", help="train one stage of one experiment")
    p.add_argument("--config", required=True, help="the experiment's config.json")
    p.add_argument("--stage", required=True)
    p.add_argument("--base", required=True, help="model folder the stage starts from")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        action="extend",
        help="tokenized data folder; a mixture's members, in the stage's dataset order (several, or --data repeated)",
    )
    p.add_argument("--out", required=True, help="the stage's folder")
    p.add_argument("--adapter", help="adapter to continue (init_from: adapter)")
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--gpus",
        type=int,
        help="hold this many GPU slots of the machine and see only those devices; more than 1 trains data-parallel with torchrun",
    )
    _add_record_failure(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge", help="merge a stage's adapter into its base")
    p.add_argument("--metrics", required=True, help="the stage's train_metrics.json")
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--gpus", type=int, help="hold this many GPU slots of the machine and see only those devices (0: none)"
    )
    _add_record_failure(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("evaluate", help="evaluate an experiment's final model")
    p.add_argument("--config", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int)
    p.add_argument("--gpus", type=int, help="hold this many GPU slots of the machine and see only those devices")
    _add_record_failure(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("search-plan", help="choose a search round's trials (Optuna ask)")
    p.add_argument("--spec", required=True, help="the round's round-{k}.spec.json")
    p.add_argument("--previous", nargs="*", default=[], help="round-{j}.json of every earlier round, in order")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_search_plan)

    p = sub.add_parser("search-tell", help="record a search round's results (state and value per trial)")
    p.add_argument("--spec", required=True)
    p.add_argument("--trials", required=True, help="the round's round-{k}.trials.json")
    p.add_argument("--experiments", nargs="*", default=[], help="the experiment running each trial, in order")
    p.add_argument("--previous", nargs="*", default=[])
    p.add_argument("--results", help="results folder (default: the one holding --trials)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_search_tell)

    p = sub.add_parser("search-best", help="a finished search's best.json and Optuna study.db")
    p.add_argument("--spec", required=True, help="the last round's round-{k}.spec.json")
    p.add_argument("--rounds", nargs="+", required=True)
    p.add_argument("--best", required=True)
    p.add_argument("--study", required=True)
    p.set_defaults(func=cmd_search_best)

    p = sub.add_parser("harness", help="run lm-evaluation-harness benchmarks on a model (eval.harness)")
    p.add_argument("--spec", required=True, help="the experiment's harness-config.json")
    p.add_argument("--model", required=True, help="model folder (the merged model, or the base for a baseline)")
    p.add_argument("--out", required=True, help="harness.json to write")
    p.add_argument("--stage", help="the earlier stage whose merged model this is (eval.harness.every_stage)")
    p.add_argument("--threads", type=int)
    p.add_argument("--gpus", type=int, help="hold this many GPU slots of the machine and see only those devices")
    p.set_defaults(func=cmd_harness)

    p = sub.add_parser("report", help="write the comparison table and plots")
    p.add_argument("--results", help="results folder (default: the parent of --out)")
    p.add_argument("--logs", default="logs")
    p.add_argument("--out", default="results/report")
    p.add_argument("--experiments", nargs="*", default=[])
    p.add_argument("--experiments-file", help="JSON list of experiment names")
    p.add_argument("--title", default="ftflow report")
    p.add_argument("--searches", nargs="*", default=[], help="searches whose trials and rounds to report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "bench", help="measure ftflow against the plain Hugging Face recipe; writes results.json and results.md"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI mode: the tiny stand-in model, few steps and rows; checks that the benchmark runs, measures nothing",
    )
    p.add_argument(
        "--gpu", action="store_true", help="also run the bf16 comparison on a Qwen3-0.6B-shaped model (needs CUDA)"
    )
    p.add_argument("--out", default="bench", help="folder for results.json and results.md")
    p.add_argument("--work", help="work folder, reused between runs (default: OUT/work)")
    p.add_argument(
        "--configfile",
        help="config whose first LoRA experiment is measured (default: config.yaml, the embedded default)",
    )
    p.add_argument("--cores", type=int, help="cores for the workflow runs that prepare the inputs (default: all)")
    p.add_argument(
        "--only",
        choices=["peers"],
        help="run one part: `peers` (ftflow vs TRL and LLaMA-Factory) updates the peers section of OUT/results.json",
    )
    p.add_argument(
        "--peer-steps", type=int, help="with --only peers: optimizer steps per run (default: the experiment's)"
    )
    p.add_argument("--peer-rounds", type=int, help="with --only peers: runs per side and method (default: 2)")
    p.add_argument(
        "--keep-peers",
        action="store_true",
        help="measure everything but the peers, and keep the peer comparison OUT/results.json already holds "
        "(from `--only peers`, the longest part)",
    )
    p.set_defaults(func=cmd_bench)
    return parser


# The steps the rules run: each says where it runs, and stops if that is not the image it was asked for.
JOB_STEPS = (cmd_prepare_model, cmd_tokenize, cmd_train, cmd_merge, cmd_evaluate, cmd_report)


# The steps that import torch and may start warm (warm.py): forked from a server that holds the imports.
WARM_STEPS = (cmd_prepare_model, cmd_tokenize, cmd_train, cmd_merge, cmd_evaluate, cmd_harness)


def where_this_job_runs() -> None:
    from . import warm
    from .container import describe, runtime

    where = runtime()
    start = f" (warm start, pid {os.getpid()})" if warm.IN_CHILD else ""
    print(f"ftflow: this job runs {describe(where)} (host {where['host']}){start}", file=sys.stderr)


def _start_warm(args) -> int | None:
    """The job's exit status when a warm server ran it; None to run it in this process."""
    if args.func not in WARM_STEPS:
        return None
    from . import warm

    if warm.why_cold() is not None:
        return None
    if args.func is cmd_train:
        try:
            _, stage = _train_stage(args)
        except (OSError, ValueError, FtflowError):
            return None  # the cold start says what is wrong
        if stage is None or _needs_bitsandbytes(stage):
            return None  # the server hides bitsandbytes: QLoRA and its optimizers start cold
    return warm.run_warm(args.argv)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a data-parallel launch re-runs the same command
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    warm_exit = _start_warm(args)
    if warm_exit is not None:
        return warm_exit
    try:
        if args.func in JOB_STEPS:
            where_this_job_runs()
        return args.func(args)
    except FtflowError as err:
        print(f"ftflow: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
