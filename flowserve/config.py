"""Model and engine configuration for one FlowServe engine (one TE).

`ModelConfig` is read from a model's own metadata (GGUF key/values or HF config.json) by
`flowserve.weights`; `EngineConfig` holds the knobs a TE is started with (KV pool size,
batch limits, device). Both are plain dataclasses so they can cross a process boundary as
JSON.
"""
from dataclasses import dataclass, field


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
    block_size: int = 16            # tokens per KV block
    num_kv_blocks: int = 0          # 0: derive from kv_cache_gb
    kv_cache_gb: float = 0.5
    max_num_seqs: int = 64          # sequences in one step
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
    max_model_len: int = 0          # 0: the model's context length
    num_threads: int = 0            # 0: leave torch's default
