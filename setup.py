"""Package metadata for tpp (Trainability Preserving Pruning) and its Triton kernels."""
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def cuda_extension() -> dict:
    """With ``TPP_BUILD_CUDA=1``: the ``tpp_kernels._C`` extension from csrc/ (torch.ops.tpp_cuda, CUDA kernels for
    ``$TORCH_CUDA_ARCH_LIST``, default sm_90); without it, nothing (tpp_kernels.cuda then builds it just in time)."""
    if os.environ.get("TPP_BUILD_CUDA") != "1":
        return {}
    try:
        import torch
    except ImportError as e:
        raise SystemExit(f"TPP_BUILD_CUDA=1 needs torch while building ({e}): "
                         "pip install --no-build-isolation ...") from e
    spec = importlib.util.spec_from_file_location("tpp_cuda_build", HERE / "tpp_kernels" / "cuda_build.py")
    cuda_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_build)
    if torch.version.cuda is None:
        raise SystemExit(f"TPP_BUILD_CUDA=1: torch {torch.__version__} has no CUDA support; install a CUDA build "
                         "of torch, or build without TPP_BUILD_CUDA")
    home = cuda_build.cuda_home()
    if home is None:
        raise SystemExit("TPP_BUILD_CUDA=1: no CUDA toolkit found (nvcc with its headers): set CUDA_HOME")
    os.environ["CUDA_HOME"] = home  # read when cpp_extension is imported, below
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cuda_build.DEFAULT_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    args = cuda_build.extension_args(with_cuda=True)
    extension = CUDAExtension(
        "tpp_kernels._C", [os.path.relpath(s, HERE) for s in args["sources"]],
        extra_compile_args={"cxx": args["extra_cflags"], "nvcc": args["extra_cuda_cflags"]})
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


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
        "timm": ["timm>=0.9"],
        "export": ["onnx>=1.15", "onnxruntime>=1.17"],           # tpp export --format onnx
    },
    entry_points={"console_scripts": ["tpp=tpp.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: PyTorch",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    **cuda_extension(),
)
