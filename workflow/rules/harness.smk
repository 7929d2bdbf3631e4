# lm-evaluation-harness benchmarks (eval.harness), apart from the task eval: their settings live in
# harness-config.json, not config.json, so editing them re-runs these jobs and the report only.


rule harness:
    """Benchmarks of the experiment's final model (the untuned base for a baseline) with lm-evaluation-harness."""
    input:
        spec=LAYOUT.harness_config("{experiment}"),
        model=get_harness_model,
    output:
        LAYOUT.harness_results("{experiment}"),
    log:
        LAYOUT.harness_log("{experiment}"),
    benchmark:
        LAYOUT.harness_benchmark("{experiment}")
    conda:
        "../../envs/ftflow.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=get_eval_gpus,
        mem_mb=16000,
        runtime=240,
    shell:
        "ftflow harness --spec {input.spec} --model {input.model} --out {output}"
        " --threads {threads} --gpus {resources.gpu} > {log} 2>&1"


rule harness_after_stage:
    """The same benchmarks on the merged model after an earlier stage (eval.harness.every_stage)."""
    input:
        spec=LAYOUT.harness_config("{experiment}"),
        model=get_harness_model,
    output:
        LAYOUT.harness_results("{experiment}", "{stage}"),
    log:
        LAYOUT.harness_log("{experiment}", "{stage}"),
    benchmark:
        LAYOUT.harness_benchmark("{experiment}", "{stage}")
    conda:
        "../../envs/ftflow.yaml"
    threads: HEAVY_THREADS
    resources:
        gpu=get_eval_gpus,
        mem_mb=16000,
        runtime=240,
    shell:
        "ftflow harness --spec {input.spec} --model {input.model} --out {output} --stage {wildcards.stage}"
        " --threads {threads} --gpus {resources.gpu} > {log} 2>&1"
