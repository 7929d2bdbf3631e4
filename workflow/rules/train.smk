rule train:
    """One training stage (on a mixture: every member's data, combined in the job); train_metrics.json is written last and marks completion."""
    input:
        config=LAYOUT.experiment_config("{experiment}"),
        base=get_stage_base,
        data=get_stage_data,
        adapter=STAGE_ADAPTER,
    output:
        metrics=LAYOUT.train_metrics("{experiment}", "{stage}"),
    log:
        LAYOUT.stage_log("{experiment}", "{stage}", "train"),
    benchmark:
        LAYOUT.stage_benchmark("{experiment}", "{stage}", "train")
    conda:
        "../../envs/ftflow.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=STAGE_GPUS,
        mem_mb=16000,
        runtime=720,
    params:
        adapter=ADAPTER_FLAG,
        out=LAYOUT.stage_dir("{experiment}", "{stage}"),
        on_failure=RECORD_FAILURE,
    shell:
        "ftflow train --config {input.config} --stage {wildcards.stage} --base {input.base}"
        " --data {input.data} --out {params.out} {params.adapter} --threads {threads}"
        " --gpus {resources.gpu} {params.on_failure} > {log} 2>&1"
