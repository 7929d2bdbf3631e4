checkpoint search_plan:
    """A search round's trials: asked of the search's Optuna sampler, or the best so far promoted."""
    input:
        spec=LAYOUT.search_round_spec("{search}", "{round}"),
        previous=get_earlier_rounds,
    output:
        trials=LAYOUT.search_round_trials("{search}", "{round}"),
    log:
        LAYOUT.search_log("{search}", "round-{round}-plan"),
    conda:
        "../../envs/ftflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "ftflow search-plan --spec {input.spec} --previous {input.previous} --out {output.trials} > {log} 2>&1"


rule search_tell:
    """The round's trials with their state and value, once every trial's experiment is evaluated."""
    input:
        spec=LAYOUT.search_round_spec("{search}", "{round}"),
        trials=LAYOUT.search_round_trials("{search}", "{round}"),
        previous=get_earlier_rounds,
        results=get_round_results,
    output:
        LAYOUT.search_round("{search}", "{round}"),
    log:
        LAYOUT.search_log("{search}", "round-{round}-tell"),
    conda:
        "../../envs/ftflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        experiments=get_round_experiments,
    shell:
        "ftflow search-tell --spec {input.spec} --trials {input.trials} --experiments {params.experiments}"
        " --previous {input.previous} --out {output} > {log} 2>&1"


rule search_best:
    """The search's best trial, the boundary it found and its Optuna study."""
    input:
        spec=get_last_round_spec,
        rounds=get_search_rounds,
    output:
        best=LAYOUT.search_best("{search}"),
        study=LAYOUT.search_study("{search}"),
    log:
        LAYOUT.search_log("{search}", "best"),
    conda:
        "../../envs/ftflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "ftflow search-best --spec {input.spec} --rounds {input.rounds} --best {output.best}"
        " --study {output.study} > {log} 2>&1"
