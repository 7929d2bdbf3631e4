rule report:
    """One row per experiment: varied settings, cost, losses, task metrics, status."""
    input:
        get_report_inputs(),
        trial_harness=TRIAL_HARNESS,
        # written by the planner, rewritten only when the list of experiments changes
        experiments=LAYOUT.experiments_file(),
    output:
        csv=report(
            LAYOUT.report_table(),
            caption="../report/summary.rst",
            category="Report",
        ),
        html=report(
            LAYOUT.report_html(),
            caption="../report/report_html.rst",
            category="Report",
        ),
        md=LAYOUT.report_markdown(),
        plots=report(
            directory(LAYOUT.report_plots()),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Plots",
        ),
    log:
        LAYOUT.report_log(),
    conda:
        "../../envs/ftflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        out=lambda w, output: os.path.dirname(output.csv),
        logs=LOGS,
        title=PLAN.report["title"],
        searches=" ".join(PLAN.searches),
    shell:
        "ftflow report --out {params.out} --logs {params.logs}"
        " --experiments-file {input.experiments} --title {params.title:q}"
        " --searches {params.searches} > {log} 2>&1"


onerror:
    # Failed jobs never reach the report rule; write the table anyway, to
    # results/report/partial/, so the failed experiments show as `failed` (with
    # the error's first line and the log path) beside the ones that finished.
    partial_out = LAYOUT.partial_report_dir()
    partial_experiments = LAYOUT.experiments_file()
    partial_log = LAYOUT.partial_report_log()
    partial_title = PLAN.report["title"] + " (partial: some jobs failed)"
    partial_searches = " ".join(PLAN.searches)
    shell(
        "mkdir -p {LOGS} && ftflow report --results {RESULTS} --logs {LOGS}"
        " --out {partial_out:q} --experiments-file {partial_experiments:q}"
        " --title {partial_title:q} --searches {partial_searches} > {partial_log:q} 2>&1 || true"
    )
