rule train:
    """One training stage; train_metrics.json is written last and marks completion."""
    input:
        config=f"{RESULTS}/{{experiment}}/config.json",
        base=get_stage_base,
        data=get_stage_data,
        adapter=get_stage_adapter,
    output:
        metrics=f"{RESULTS}/{{experiment}}/{{stage}}/train_metrics.json",
    log:
        f"{LOGS}/{{experiment}}/{{stage}}/train.log",
    benchmark:
        f"benchmarks/{{experiment}}/{{stage}}/train.tsv"
    conda:
        "../../envs/ftflow.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=get_stage_gpus,
        mem_mb=16000,
        runtime=720,
    params:
        adapter=adapter_flag,
        out=lambda w: f"{RESULTS}/{w.experiment}/{w.stage}",
    shell:
        "ftflow train --config {input.config} --stage {wildcards.stage} --base {input.base}"
        " --data {input.data} --out {params.out} {params.adapter} --threads {threads}"
        " --gpus {resources.gpu} > {log} 2>&1"
