"""ftflow: fine-tuning experiments as a Snakemake workflow."""

__version__ = "0.1.0"
