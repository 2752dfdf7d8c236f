"""Weft: a Megatron-style 3D-parallel pretraining engine. `make test` / `make demo` set everything up."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = next(
    line.split('"')[1] for line in (ROOT / "engine" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)

setup(
    name="weft",
    version=VERSION,
    description="Megatron-style 3D-parallel pretraining engine for decoder-only language models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    # torch as a range so GPU users keep the build they have; the Makefile pins the CPU wheel for our machines.
    install_requires=[
        "torch>=2.11",
        "numpy>=1.26",
        "tokenizers>=0.20",
        "tqdm>=4.60",
        "zstandard>=0.22",
        "pyarrow>=15",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "safetensors>=0.4",
    ],
    extras_require={
        # A faster encoder for HF BPE tokenizers; used only after it reproduces HF's ids on a sample.
        "fast": ["gigatoken>=0.10", "awkward>=2"],
        "wandb": ["wandb>=0.31"],
        "tensorboard": ["tensorboard>=2.14"],  # logging.tensorboard=true (torch's SummaryWriter needs it)
        # transformers: our GPT-2 and Llama forward passes are tested against its models (nothing downloaded).
        # triton: the kernels' tests run it through its CPU interpreter (Linux wheels only; skipped elsewhere).
        "test": ["pytest>=8", "ruff>=0.6", "gigatoken>=0.10", "awkward>=2", "transformers>=5", "wandb>=0.31",
                 "tensorboard>=2.14", "triton>=3.6; platform_system == 'Linux'"],
        "hf": ["transformers>=5"],
    },
    entry_points={
        "console_scripts": [
            "weft-preprocess=engine.data.preprocess:main",
            "weft-train-tokenizer=engine.data.train_tokenizer:main",
            "weft-build-corpus=engine.data.builtin_corpus:main",
            "weft-inspect-shards=engine.data.inspect_shards:main",
            "weft-merge-shards=engine.data.merge_shards:main",
            "weft-train=engine.train:cli",
            "weft-launch=engine.launch:main",
            "weft-compare-runs=engine.training.compare_runs:main",
        ]
    },
)
