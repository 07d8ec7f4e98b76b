"""MesaNet in JAX/Flax with Pallas kernels."""
from setuptools import find_packages, setup

# Pinned to what the GPU machines carry, so CPU and GPU runs agree.
JAX_VERSION = "0.11.2"

setup(
    name="mesanet-jax",
    version="0.1.0",
    description="MesaNet (locally optimal test-time training) in JAX/Flax with Pallas kernels",
    python_requires=">=3.12",
    # experiments/ (the CLIs and configs; `python -m experiments.train` from the checkout) installs under a name of
    # its own, so that no generic top-level `experiments` package lands in site-packages.
    packages=find_packages(include=["mesanet_jax", "mesanet_jax.*", "pallas_kernels", "pallas_kernels.*"])
    + ["mesanet_experiments", "mesanet_experiments.configs"],
    package_dir={"mesanet_experiments": "experiments"},
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
        # pytest < 9.2: pytest-xdist 3.8's --dist loadgroup (pytest.ini) sets item._nodeid, which 9.2 no longer reads
        "test": ["pytest>=8,<9.2", "pytest-xdist", "tensorflow-datasets==4.9.10", "importlib_resources",
                 "sentencepiece>=0.2", "datasets>=3.0"],
        "data": ["tensorflow-datasets==4.9.10", "sentencepiece>=0.2", "datasets>=3.0"],
        "gpu": [f"jax[cuda13]=={JAX_VERSION}"],
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
    },
    entry_points={"console_scripts": [
        "mesanet-train = mesanet_experiments.train:run",
        "mesanet-eval = mesanet_experiments.evaluate:run",
        "mesanet-export = mesanet_experiments.export:run",
        "mesanet-generate = mesanet_experiments.generate:run",
        "mesanet-mad-grid = mesanet_experiments.mad_grid:run",
        "mesanet-mad-table = mesanet_experiments.mad_table:run",
        "mesanet-prepare = mesanet_experiments.prepare:run",
    ]},
)
