"""MesaNet in JAX/Flax with Pallas kernels."""
from setuptools import find_packages, setup

# Pinned to what the GPU machines carry, so CPU and GPU runs agree.
JAX_VERSION = "0.11.2"

setup(
    name="mesanet-jax",
    version="0.1.0",
    description="MesaNet (locally optimal test-time training) in JAX/Flax with Pallas kernels",
    python_requires=">=3.12",
    packages=find_packages(include=["mesanet_jax", "mesanet_jax.*", "pallas_kernels", "pallas_kernels.*",
                                    "experiments", "experiments.*"]),
    install_requires=[
        f"jax=={JAX_VERSION}",
        "flax==0.12.10",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.4",
        "absl-py",
        "ml-collections",
        "numpy",
        # the trainer: input pipelines, metrics, progress bar
        "grain==0.2.18",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.60",
        # ships the default English corpus (the Lee news corpus in its test data); gensim itself is never imported
        "gensim==4.4.0",
        # mesanet-export's Hugging Face format
        "safetensors>=0.4",
        # mesanet-prepare and data.source="arrayrecord": tokenizer.json (GPT-2's BPE), .zst and Parquet inputs
        "tokenizers>=0.20",
        "zstandard>=0.22",
        "pyarrow>=15",
    ],
    extras_require={
        "test": ["pytest", "portpicker", "tensorflow-datasets==4.9.10", "importlib_resources", "sentencepiece>=0.2",
                 "datasets>=3.0"],
        "data": ["tensorflow-datasets==4.9.10", "sentencepiece>=0.2", "datasets>=3.0"],
        "gpu": [f"jax[cuda13]=={JAX_VERSION}"],
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
    },
    entry_points={"console_scripts": [
        "mesanet-train = experiments.train:run",
        "mesanet-eval = experiments.evaluate:run",
        "mesanet-export = experiments.export:run",
        "mesanet-generate = experiments.generate:run",
        "mesanet-mad-grid = experiments.mad_grid:run",
        "mesanet-mad-table = experiments.mad_table:run",
        "mesanet-prepare = experiments.prepare:run",
    ]},
)
