"""Build the ``tpp_cuda`` extension (``csrc/``) with ``torch.utils.cpp_extension``: just in time, or from setup.py.

``build()`` compiles ``csrc/tpp_ops.cpp`` (ops, registration, CPU kernels) and, when torch has CUDA and a CUDA
toolkit is found, ``csrc/tpp_kernels.cu`` (the CUDA kernels), into a directory keyed on a hash of the sources, the
torch version and the build settings — under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions`` — and
returns the library's path. A finished directory is reused as it is: changing any source changes the key, so a
stale build is never loaded. The compiler runs in a child process (its environment gets ``CUDA_HOME``, the target
architectures and ``ninja``), so a failed build raises :class:`BuildError` with the compiler's output.

Settings: ``CUDA_HOME`` (else found from ``nvcc``), ``TORCH_CUDA_ARCH_LIST`` (default ``"9.0"``: H100/H200, sm_90),
``MAX_JOBS`` (parallel compiles). From the command line: ``python -m tpp_kernels.cuda_build [--verbose] [--cpu-only]``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = ["BuildError", "SOURCE_DIR", "build", "cuda_home", "source_hash", "extension_args"]

SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
NAME = "tpp_cuda"
DEFAULT_ARCH_LIST = "9.0"
_DONE = "build.done"  # written last: a directory without it is rebuilt


class BuildError(RuntimeError):
    """The extension cannot be built here (missing tools) or its compilation failed."""


def source_hash() -> str:
    """SHA-256 prefix over the names and contents of the files in ``SOURCE_DIR`` (compiled into the library)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in SOURCE_DIR.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return "h" + digest.hexdigest()[:16]


def cuda_home() -> str | None:
    """The CUDA toolkit root: ``$CUDA_HOME``, ``$CUDA_PATH``, the install of ``nvcc`` on ``PATH``, or
    ``/usr/local/cuda`` — the first with ``bin/nvcc`` and ``include/cuda_runtime.h`` (an ``nvcc`` wrapper script in
    ``/usr/local/bin`` is skipped that way); ``None`` if there is none."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  str(Path(nvcc).resolve().parent.parent) if nvcc else None, "/usr/local/cuda"]
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return str(Path(home))
    return None


def _with_cuda() -> bool:
    return torch.version.cuda is not None and cuda_home() is not None


def extension_args(with_cuda: bool) -> dict:
    """Sources and compiler flags shared by the JIT build and setup.py."""
    macros = [f"-DTPP_SOURCE_HASH={source_hash()}"] + (["-DTPP_WITH_CUDA"] if with_cuda else [])
    sources = [SOURCE_DIR / "tpp_ops.cpp"] + ([SOURCE_DIR / "tpp_kernels.cu"] if with_cuda else [])
    return {
        "sources": [str(s) for s in sources],
        "extra_cflags": ["-O3", *macros],
        "extra_cuda_cflags": ["-O3", "-lineinfo", *macros] if with_cuda else [],
    }


def _arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def build_dir(with_cuda: bool) -> Path:
    """The build directory for the current sources, torch and settings."""
    key = "|".join([source_hash(), torch.__version__, str(torch.version.cuda), sys.version,
                    f"cuda={with_cuda}", cuda_home() or "", _arch_list() if with_cuda else ""])
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch_extensions")
    return Path(root) / f"{NAME}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _ninja_dirs() -> list[str]:
    """Where ``ninja`` may be: the ``ninja`` package's binary dir and the running interpreter's bin dir."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja
        dirs.insert(0, ninja.BIN_DIR)
    except ImportError:
        pass
    return dirs


def build(verbose: bool = False, with_cuda: bool | None = None) -> Path:
    """Path of the built library for the current sources, compiling it first if needed (about 20 s on two cores,
    CUDA kernels included). ``with_cuda=None``: with the CUDA kernels when torch has CUDA and a toolkit is found."""
    with_cuda = _with_cuda() if with_cuda is None else with_cuda
    if with_cuda and torch.version.cuda is None:
        raise BuildError(f"torch {torch.__version__} has no CUDA support: the CUDA kernels cannot be built")
    if with_cuda and cuda_home() is None:
        raise BuildError("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    directory = build_dir(with_cuda)
    library = directory / f"{NAME}.so"
    if (directory / _DONE).exists() and library.exists():
        return library
    env = dict(os.environ, PATH=os.pathsep.join([*_ninja_dirs(), os.environ.get("PATH", "")]))
    if with_cuda:
        env.update(CUDA_HOME=cuda_home(), TORCH_CUDA_ARCH_LIST=_arch_list())
    if shutil.which("ninja", path=env["PATH"]) is None:
        raise BuildError("ninja is not installed (pip install ninja)")
    directory.mkdir(parents=True, exist_ok=True)
    print(f"tpp: compiling the {NAME} extension {'with' if with_cuda else 'without'} its CUDA kernels into "
          f"{directory} (once per source version)", file=sys.stderr)
    command = [sys.executable, "-m", "tpp_kernels.cuda_build", "--child", str(directory)]
    command += (["--cuda"] if with_cuda else []) + (["--verbose"] if verbose else [])
    started = time.perf_counter()
    child = subprocess.run(command, env=env, text=True,
                           cwd=str(SOURCE_DIR.parent), stdout=None if verbose else subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    if child.returncode != 0 or not library.exists():
        log = (child.stdout or "")[-6000:]
        raise BuildError(f"building {NAME} in {directory} failed (exit {child.returncode}):\n{log}")
    (directory / _DONE).write_text(f"{time.perf_counter() - started:.1f} s\n")
    return library


def _child(directory: str, with_cuda: bool, verbose: bool) -> None:
    """Runs in the build process: compile and link ``directory/tpp_cuda.so`` (ninja, incremental)."""
    from torch.utils.cpp_extension import load

    load(name=NAME, build_directory=directory, verbose=verbose, with_cuda=with_cuda, is_python_module=False,
         **extension_args(with_cuda))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    parser.add_argument("--cpu-only", action="store_true", help="build without the CUDA kernels")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.cuda, args.verbose)
        return
    started = time.perf_counter()
    try:
        path = build(verbose=args.verbose, with_cuda=False if args.cpu_only else None)
    except BuildError as e:
        sys.exit(str(e))
    print(f"{path} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
