"""Choosing the device and dtype, as pure functions of what torch reports (testable without a GPU).

ROCm builds of torch expose AMD GPUs through the `torch.cuda` API (HIP), so "cuda" means "the GPU"
on both vendors; `torch.version.hip` tells which runtime it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autocaption.errors import ModelUnavailable
from autocaption.plural import counted


@dataclass(frozen=True)
class Gpu:
    name: str
    total_bytes: int
    free_bytes: int | None  # None when the device could not be asked
    arch: str  # "gfx1100" on ROCm, "sm_90" on CUDA


@dataclass(frozen=True)
class Accelerator:
    """What torch says about the machine."""

    gpu_count: int
    hip_version: str | None  # torch.version.hip on ROCm builds
    cuda_version: str | None  # torch.version.cuda on CUDA builds
    bf16_supported: bool
    names: tuple[str, ...] = ()
    gpus: tuple[Gpu, ...] = ()
    torch_version: str = ""

    @property
    def runtime(self) -> str:
        if self.hip_version:
            return f"ROCm {self.hip_version}"
        return f"CUDA {self.cuda_version}" if self.cuda_version else "CPU-only torch build"


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu", "cuda:0"
    dtype: str  # "float32", "bfloat16", "float16"
    description: str  # for the log: "cuda:0 (AMD Instinct MI210, ROCm 6.2)"
    warning: str | None = None


def place(requested_device: str, requested_dtype: str, acc: Accelerator) -> Placement:
    """Resolve `model.device` and `model.dtype` from the config against the machine."""
    warning = None
    if requested_device == "cpu" or (requested_device == "auto" and acc.gpu_count == 0):
        device = "cpu"
        description = "cpu"
        if requested_device == "auto":
            warning = f"no GPU visible to torch; running on the CPU, which is slow. {_why_no_gpu(acc)}"
    else:
        index = 0 if requested_device in ("auto", "cuda") else int(requested_device.split(":", 1)[1])
        if index >= acc.gpu_count:
            raise ModelUnavailable(
                f"model.device: {requested_device} requested but torch sees {counted(acc.gpu_count, 'GPU')} "
                f"({acc.runtime}); check HIP_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES and the render/video groups"
            )
        device = f"cuda:{index}"
        name = acc.names[index] if index < len(acc.names) else "GPU"
        description = f"{device} ({name}, {acc.runtime})"
    if requested_dtype != "auto":
        dtype = requested_dtype
    elif device == "cpu":
        dtype = "float32"  # half precision on CPU is slow and, for some ops, unsupported
    else:
        dtype = "bfloat16" if acc.bf16_supported else "float16"
    return Placement(device=device, dtype=dtype, description=description, warning=warning)


def _why_no_gpu(acc: Accelerator) -> str:
    """What to do about it: a GPU build that sees no GPU needs the driver or the device files, not another
    torch; a CPU-only build needs the GPU build (`autocaption doctor` checks both)."""
    if acc.hip_version:
        return (
            f"torch is a ROCm {acc.hip_version} build: check /dev/kfd and /dev/dri (the render and video "
            "groups), HIP_VISIBLE_DEVICES, and HSA_OVERRIDE_GFX_VERSION for a consumer card (autocaption doctor)"
        )
    if acc.cuda_version:
        return (
            f"torch is a CUDA {acc.cuda_version} build: check the NVIDIA driver (nvidia-smi) and "
            "CUDA_VISIBLE_DEVICES (autocaption doctor); on a machine without a GPU this is expected"
        )
    return "torch is a CPU-only build: for a GPU, install torch's ROCm or CUDA build (README: Install)"


def ram_available() -> int | None:
    """Bytes of RAM available to a new process (the kernel's MemAvailable); None when it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
