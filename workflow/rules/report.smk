rule report:
    """One row per experiment: varied settings, cost, losses, task metrics, status."""
    input:
        get_report_inputs(),
        experiments=experiments_file(),
    output:
        csv=report(
            f"{RESULTS}/report/summary.csv",
            caption="../report/summary.rst",
            category="Report",
        ),
        html=report(
            f"{RESULTS}/report/report.html",
            caption="../report/report_html.rst",
            category="Report",
        ),
        md=f"{RESULTS}/report/report.md",
        plots=report(
            directory(f"{RESULTS}/report/plots"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Plots",
        ),
    log:
        f"{LOGS}/report.log",
    conda:
        "../../envs/ftflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        out=lambda w, output: output.csv.rsplit("/", 1)[0],
        logs=LOGS,
        title=report_title(),
    shell:
        "ftflow report --out {params.out} --logs {params.logs}"
        " --experiments-file {input.experiments} --title {params.title:q} > {log} 2>&1"
