"""ms_prune: head pruning, token dropping and layer dropping for MindSpore transformers.

The model zoo lives in the top-level ``models/`` folder of the source tree and is installed as
``ms_prune.models`` (never as a bare top-level ``models`` package, which would collide with other
projects in site-packages).
"""
from setuptools import find_packages, setup

library_packages = find_packages(include=["ms_prune", "ms_prune.*"])
model_packages = ["ms_prune.models"] + [
    "ms_prune.models." + name for name in find_packages(where="models")
]

setup(
    name="ms_prune",
    version="0.1.0",
    description="Attention-head pruning (LRP, GradNAS), random-LTD and progressive layer "
    "dropping for MindSpore transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=library_packages + model_packages,
    package_dir={"ms_prune.models": "models"},
    entry_points={"console_scripts": ["ms-prune=ms_prune.cli:main"]},
    python_requires=">=3.9",
    install_requires=[
        "mindspore>=2.3",
        # NumPy 2 breaks MindSpore 2.10 at run time ("numpy.core.multiarray failed to import").
        "numpy<2",
        "pyyaml",
        "safetensors",
    ],
    extras_require={
        # gguf: ms_prune.hub.smollm2_dir() converts SmolLM2's GGUF file (tests use the model)
        "test": ["pytest", "pytest-xdist", "tokenizers", "hypothesis", "gguf"],
        "samples": ["tokenizers", "matplotlib", "gguf"],
        "hub": ["tokenizers", "gguf"],
    },
)
