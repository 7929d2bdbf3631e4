rule evaluate:
    """Loss, perplexity, generations and task metrics of the experiment's final model."""
    input:
        config=LAYOUT.experiment_config("{experiment}"),
        model=get_eval_model,
        data=get_eval_data,
    output:
        predictions=LAYOUT.predictions("{experiment}"),
        metrics=LAYOUT.eval_metrics("{experiment}"),
    log:
        LAYOUT.eval_log("{experiment}"),
    benchmark:
        LAYOUT.eval_benchmark("{experiment}")
    conda:
        "../../envs/ftflow.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=EVAL_GPUS,
        mem_mb=16000,
        runtime=240,
    params:
        out=LAYOUT.eval_dir("{experiment}"),
        on_failure=RECORD_FAILURE,
    shell:
        "ftflow evaluate --config {input.config} --model {input.model} --data {input.data}"
        " --out {params.out} --threads {threads} --gpus {resources.gpu} {params.on_failure} > {log} 2>&1"
