rule tokenize:
    """Tokenized dataset + stats.json, shared by every experiment with the same data_id."""
    input:
        spec=f"{RESULTS}/data/{{data_id}}.json",
        model=get_data_model,
    output:
        directory(f"{RESULTS}/data/{{data_id}}"),
    log:
        f"{LOGS}/data/{{data_id}}.log",
    conda:
        "../../envs/ftflow.yaml"
    threads: 1 if PLAN.smoke else 2
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "ftflow tokenize --spec {input.spec} --out {output} --threads {threads} > {log} 2>&1"
