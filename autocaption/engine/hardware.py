"""What torch says about the machine, and a self-check of the attention kernel tree decoding relies on.

Imports torch (this package is the only place that may): used by `autocaption doctor` and by the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from autocaption.engine.devices import Accelerator, Gpu, ram_available


def accelerator() -> Accelerator:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = []
    for index in range(count):
        properties = torch.cuda.get_device_properties(index)
        try:
            free, _ = torch.cuda.mem_get_info(index)
        except RuntimeError:  # a device that cannot be opened (permissions): say so through free=None
            free = None
        # ROCm names the architecture (gfx1100); CUDA gives the compute capability.
        arch = getattr(properties, "gcnArchName", None) or f"sm_{properties.major}{properties.minor}"
        gpus.append(Gpu(properties.name, int(properties.total_memory), free, arch.split(":", 1)[0]))
    return Accelerator(
        gpu_count=count,
        hip_version=getattr(torch.version, "hip", None),
        cuda_version=torch.version.cuda,
        bf16_supported=count > 0 and torch.cuda.is_bf16_supported(),
        names=tuple(gpu.name for gpu in gpus),
        gpus=tuple(gpus),
        torch_version=torch.__version__,
    )


def memory_free(device: str) -> int | None:
    """Bytes free on the device (a GPU's free memory, or the CPU's available RAM); None when unknown."""
    if device.startswith("cuda"):
        try:
            free, _ = torch.cuda.mem_get_info(torch.device(device))
        except RuntimeError:
            return None
        return int(free)
    return ram_available()


def masked_sdpa_problem(
    device: str, dtype: torch.dtype = torch.float16, *, heads: int = 32, kv_length: int = 2400, head_dim: int = 128
) -> str | None:
    """Does scaled_dot_product_attention with a custom additive mask (what tree decoding feeds it) agree
    with the plain math kernel on this device? PyTorch's AOTriton memory-efficient kernel returned wrong
    results for custom masks on some ROCm builds (torch 2.6.0+rocm6.2.4, pytorch issue 147460).
    None when they agree; else what differed. Random data of the model's head shapes, well under a second."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    rows = 12

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    query, key, value = (
        random(1, heads, rows, head_dim),
        random(1, heads, kv_length, head_dim),
        random(1, heads, kv_length, head_dim),
    )
    mask = torch.zeros(1, 1, rows, kv_length)
    mask[..., kv_length // 2 :] = float("-inf")  # each row sees the shared prefix and a few of its own
    for row in range(rows):
        mask[0, 0, row, kv_length // 2 + row] = 0.0
    mask = mask.to(device=device, dtype=dtype)
    with torch.no_grad():
        fast = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        with sdpa_kernel(SDPBackend.MATH):
            exact = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    error = (fast.float() - exact.float()).abs().max().item()
    tolerance = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    if error != error or error > tolerance:  # NaN, or off
        return f"largest difference {error:.3g} (tolerance {tolerance:g}) with a custom mask on {device}"
    return None
