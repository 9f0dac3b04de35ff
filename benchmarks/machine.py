"""The machine a run measured: device name, driver, library versions — recorded in every result file."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
        return out[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # /proc/driver/nvidia/version: "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  ..."
        match = re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())
        return match.group(1) if match else "unknown"
    except OSError:
        return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_name(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` or ``"AMD EPYC, 2 cores"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {os.cpu_count()} cores"


def slug(device: torch.device) -> str:
    """File-name form of the device: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-2c``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {_cpu_model()} {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def describe(device: torch.device) -> dict:
    """Device, driver and versions, threads and float32 matmul precision, for the result's ``machine_info``."""
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "driver": _nvidia_driver() if device.type == "cuda" else "n/a",
        "cuda_runtime": torch.version.cuda or "n/a",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info


def write_result(out: Path, name: str, device: torch.device, result: dict, markdown: str) -> Path:
    """``result`` and its ``markdown`` as ``<out>/<name>-<slug(device)>-<date>.{json,md}``; returns the ``.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{slug(device)}-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    return stem.with_suffix(".md")
