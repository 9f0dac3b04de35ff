"""Package metadata for tpp (Trainability Preserving Pruning) and its Triton kernels."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="tpp",
    version="0.1.0",
    description="Trainability Preserving Pruning (Wang & Fu, ICLR 2023) for PyTorch, with fused Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["tpp", "tpp.*", "tpp_kernels", "tpp_kernels.*"]),
    install_requires=["torch>=2.4", "torchvision"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "demo": ["scikit-learn>=1.2", "matplotlib>=3.6"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: PyTorch",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
