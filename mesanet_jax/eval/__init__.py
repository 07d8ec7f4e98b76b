"""Evaluation and export of trained models: loading runs, losses by position, CG sweeps, plots, and the
flash-linear-attention / Hugging Face export."""
