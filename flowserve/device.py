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


def compute_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (bfloat16 matmuls run several times slower there); bfloat16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16
