rule merge:
    """The stage's model merged into one folder (a status placeholder if the stage did not finish ok)."""
    input:
        metrics=LAYOUT.train_metrics("{experiment}", "{stage}"),
        base=get_stage_base,
    output:
        directory(LAYOUT.merged_dir("{experiment}", "{stage}")),
    log:
        LAYOUT.stage_log("{experiment}", "{stage}", "merge"),
    conda:
        "../../envs/ftflow.yaml"
    threads: min(2, HEAVY_THREADS)
    resources:
        # Merging runs on the CPU (fp32 weights), so it holds no GPU slot and sees no device.
        gpu=0,
        mem_mb=16000,
        runtime=60,
    params:
        on_failure=RECORD_FAILURE,
    shell:
        "ftflow merge --metrics {input.metrics} --base {input.base} --out {output} --threads {threads}"
        " --gpus {resources.gpu} {params.on_failure} > {log} 2>&1"
