"""prism_mcore: PRISM (SFT -> adversarial distribution alignment -> RLVR) for Qwen3-VL on Megatron-Core.

Megatron-Core and Megatron-Bridge are pinned in requirements/megatron.txt and installed by tools/install.sh with
--no-deps (see that file for why); everything they need at run time is listed here.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

MEGATRON_PINS = [
    line.strip()
    for line in (ROOT / "requirements" / "megatron.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

INSTALL_REQUIRES = [
    "torch>=2.6",
    # megatron-bridge 0.6.2 accepts transformers >=5.8,<=5.12.1 and needs its Qwen3-VL classes.
    "transformers==5.12.1",
    "tokenizers>=0.22,<0.23",
    "triton>=3.4",
    "datasets>=4.0",
    "pyarrow>=14",
    "math-verify[antlr4_9_3]==0.9.0",  # antlr 4.9.3: the runtime omegaconf and hydra-core pin
    "safetensors>=0.5",
    "pillow>=10",
    "numpy>=1.26",
    "psutil>=5.9",  # megatron-core's dist_checkpointing imports it without declaring it
    "einops>=0.8",
    "omegaconf>=2.3",  # megatron-bridge model providers
    "hydra-core>=1.3.4,<1.4",  # megatron-bridge imports hydra utilities
    "accelerate>=1.0",
    "huggingface_hub>=1.0",
    "regex",
    "rich",
    "tqdm>=4.67",
    "pyyaml>=6.0",
    "typing-extensions",
    "matplotlib>=3.8",  # the training-curve plot every run leaves behind
    "requests>=2.31",  # SGLang HTTP client
]

EXTRAS = {
    "gpu": ["transformer-engine[pytorch]>=2.8", "flash-attn>=2.7"],
    "sglang": ["sglang[all]==0.5.23"],
    "dali": ["nvidia-dali-cuda120>=2.0"],
    "dali-cu13": ["nvidia-dali-cuda130>=2.0"],
    "tensorboard": ["tensorboard>=2.19"],
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6"],
}

setup(
    name="prism_mcore",
    version="0.1.0",
    description=__doc__.splitlines()[0],
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[*find_packages(include=["prism_mcore", "prism_mcore.*"]), "prism_kernels"],
    package_dir={"prism_kernels": "kernels"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["prism-mcore=prism_mcore.cli:main"]},
)
