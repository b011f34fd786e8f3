"""Where a TE computes: Ascend NPU (torch_npu), CUDA, or CPU, chosen once at start.

torch_npu is imported only when asked for or when auto-detecting, since importing it on a
machine without the CANN runtime fails.
"""
import torch


def pick_device(name: str = "auto") -> torch.device:
    if name in ("auto", "npu"):
        try:
            import torch_npu  # noqa: F401  (registers the "npu" device with torch)
            if torch.npu.is_available():
                return torch.device("npu")
        except ImportError:
            if name == "npu":
                raise
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if name not in ("auto", "cpu"):
        raise RuntimeError(f"device {name!r} is not available")
    return torch.device("cpu")


def compute_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The weights' and activations' dtype. `auto`: float32 on CPU, bfloat16 on accelerators.
    Lower precision is not the default on CPU: bfloat16 matmuls run there, but SmolLM2-135M's
    greedy answers in bfloat16 agree with float32 on only 6 of 10 chat prompts, and on this
    CPU (no AVX-512) bfloat16 is also 3x slower (docs/BENCHMARKS.md section 9)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
