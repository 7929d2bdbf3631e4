"""`ftflow bench`: ftflow measured against the plain Hugging Face recipe and its peers, in one run.

    inputs            the embedded default's model and data, prepared and tokenized by
                      ftflow's own workflow under bench/work/ (cached between runs)
    train_throughput  padded-recipe Trainer vs ftflow's train path, LoRA and full
    generation        one prompt at a time vs ftflow's batched greedy decoding
    dag               `snakemake -n` and `ftflow resolve` for 10/100/500-experiment sweeps
    tokenization      rows/s per data kind, and the cost of a tokenization cache hit
    gpu               the training comparison and peak memory on a Qwen3-0.6B-shaped model (CUDA only)
    peers             ftflow vs TRL (trl_side) and LLaMA-Factory (llamafactory_side) on the same job,
                      the rows from peer_rows, scored by ftflow's evaluator; peers_report renders it;
                      profile_step profiles one step of a side
    report            bench/results.json and bench/results.md

Each timed side runs in its own process (worker.py), so peak memory is per side
and one side's allocations never slow the other; the sides alternate to cancel
machine drift. Nothing here is imported by the workflow itself.
"""
