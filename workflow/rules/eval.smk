rule evaluate:
    """Loss, perplexity, generations and task metrics of the experiment's final model."""
    input:
        config=f"{RESULTS}/{{experiment}}/config.json",
        model=get_eval_model,
        data=get_eval_data,
    output:
        predictions=f"{RESULTS}/{{experiment}}/eval/predictions.jsonl",
        metrics=f"{RESULTS}/{{experiment}}/eval/metrics.json",
    log:
        f"{LOGS}/{{experiment}}/eval.log",
    benchmark:
        f"benchmarks/{{experiment}}/eval.tsv"
    conda:
        "../../envs/ftflow.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=get_eval_gpus,
        mem_mb=16000,
        runtime=240,
    params:
        out=lambda w: f"{RESULTS}/{w.experiment}/eval",
    shell:
        "ftflow evaluate --config {input.config} --model {input.model} --data {input.data}"
        " --out {params.out} --threads {threads} --gpus {resources.gpu} > {log} 2>&1"
