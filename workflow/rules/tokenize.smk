rule tokenize:
    """Tokenized dataset + stats.json, shared by every experiment with the same data_id."""
    input:
        spec=LAYOUT.data_spec("{data_id}"),
        model=get_data_model,
    output:
        directory(LAYOUT.data_dir("{data_id}")),
    log:
        LAYOUT.data_log("{data_id}"),
    conda:
        "../../envs/ftflow.yaml"
    # Up to one datasets.map worker per 5,000 chat rows (data.ROWS_PER_PROCESS);
    # Snakemake lowers this to --cores. Instruction and text rows run in one
    # process: the fast tokenizer spreads each batch over the cores itself.
    threads: 1 if PLAN.smoke else 8
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "ftflow tokenize --spec {input.spec} --out {output} --threads {threads} > {log} 2>&1"
