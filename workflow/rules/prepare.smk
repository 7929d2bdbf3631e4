rule prepare_model:
    """Base model as an HF safetensors folder (GGUF de-quantized, hub downloaded, or smoke stand-in)."""
    input:
        spec=LAYOUT.model_spec("{model}"),
    output:
        directory(LAYOUT.model_dir("{model}")),
    log:
        LAYOUT.model_log("{model}"),
    conda:
        "../../envs/ftflow.yaml"
    threads: 1 if PLAN.smoke else 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "ftflow prepare-model --spec {input.spec} --out {output} --threads {threads} > {log} 2>&1"
