"""Weights: from a model file on disk to the float tensors `flowserve.model` runs on.

Two source formats:
- GGUF (llama.cpp's single file): tensors dequantized with the `gguf` package; the Q/K
  rows that llama.cpp's converter permuted for its RoPE layout are put back in HF order.
- HF directory: config.json + *.safetensors.

Either way the result is a flat dict in the model's own naming, already fused
(wqkv, w_gate_up) and in the compute dtype. The first load writes it to a
loading-optimized copy (one contiguous safetensors file in the cache dir,
`DEEPFLOW_CACHE` or ~/.cache/deepflow); later loads mmap that copy, so nothing is parsed or
dequantized again and forked TEs share the pages.
"""
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowserve.config import ModelConfig, config_from_gguf, config_from_hf, gguf_fields, weights_cache_path

log = logging.getLogger("flowserve.weights")

# ---------------------------------------------------------------- raw tensors, per format

_GGUF_NAMES = {
    "token_embd": "embed", "output_norm": "norm", "output": "lm_head",
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q": "wq", "attn_k": "wk",
    "attn_v": "wv", "attn_output": "wo", "ffn_gate": "w_gate", "ffn_up": "w_up",
    "ffn_down": "w_down",
}
_HF_NAMES = {
    "embed_tokens": "embed", "norm": "norm", "lm_head": "lm_head",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
    "gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down",
}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's converter permutation of Q/K rows (interleaved -> half-split RoPE)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    cfg = config_from_gguf(gguf_fields(reader), Path(path).stem)
    tensors = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.3.attn_q.weight | token_embd.weight
        if parts[0] == "blk":
            name = f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}"
        elif parts[0] in _GGUF_NAMES:
            name = _GGUF_NAMES[parts[0]]
        else:
            continue  # e.g. rope_freqs: recomputed from the config
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy: F32 data is the read-only mmap
        w = w.reshape(tuple(reversed([int(d) for d in t.shape])))
        if name.endswith(".wq"):
            w = _unpermute(w, cfg.num_heads)
        elif name.endswith(".wk"):
            w = _unpermute(w, cfg.num_kv_heads)
        tensors[name] = w
    cfg.tie_word_embeddings = "lm_head" not in tensors
    return cfg, tensors


def read_hf_dir(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    root = Path(path)
    cfg = config_from_hf(json.loads((root / "config.json").read_text()), root.name)
    tensors = {}
    for f in sorted(root.glob("*.safetensors")):
        for key, w in load_file(str(f)).items():
            parts = key.removeprefix("model.").split(".")  # layers.3.self_attn.q_proj.weight
            if parts[0] == "layers":
                tensors[f"layers.{parts[1]}.{_HF_NAMES[parts[-2]]}"] = w
            elif parts[0] in _HF_NAMES:
                tensors[_HF_NAMES[parts[0]]] = w
    cfg.tie_word_embeddings = "lm_head" not in tensors
    return cfg, tensors


# ---------------------------------------------------------------- fuse, cache, load

def fuse(cfg: ModelConfig, raw: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Model-ready tensors: QKV and gate/up fused so each layer runs 4 matmuls, not 7."""
    t = {k: torch.as_tensor(v).to(dtype).contiguous() for k, v in raw.items()}
    out = {"embed": t["embed"], "norm": t["norm"]}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = t["lm_head"]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out[p + "attn_norm"] = t[p + "attn_norm"]
        out[p + "ffn_norm"] = t[p + "ffn_norm"]
        out[p + "wqkv"] = torch.cat([t[p + "wq"], t[p + "wk"], t[p + "wv"]])
        out[p + "wo"] = t[p + "wo"]
        out[p + "w_gate_up"] = torch.cat([t[p + "w_gate"], t[p + "w_up"]])
        out[p + "w_down"] = t[p + "w_down"]
    return out


def load_weights(model_path: str, dtype: torch.dtype = torch.float32,
                 use_cache: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and CPU tensors for `model_path`; from the mmap'ed cache when there is one."""
    t0 = time.perf_counter()
    cached = weights_cache_path(model_path, str(dtype).removeprefix("torch."))
    if use_cache and cached.exists():
        with safe_open(str(cached), "pt") as f:  # mmap: pages come from the page cache on demand
            cfg = ModelConfig(**json.loads(f.metadata()["deepflow.config"]))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        log.info("loaded %s from cache %s in %.3f s", model_path, cached, time.perf_counter() - t0)
        return cfg, tensors

    if os.path.isdir(model_path):
        cfg, raw = read_hf_dir(model_path)
    else:
        cfg, raw = read_gguf(model_path)
    tensors = fuse(cfg, raw, dtype)
    log.info("loaded %s (%s) in %.3f s", model_path, "HF dir" if os.path.isdir(model_path) else "GGUF",
             time.perf_counter() - t0)
    if use_cache:
        t1 = time.perf_counter()
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"deepflow.config": json.dumps(asdict(cfg))})
        os.replace(tmp, cached)  # atomic: a concurrent reader never sees half a file
        log.info("wrote loading-optimized cache %s in %.3f s", cached, time.perf_counter() - t1)
    return cfg, tensors
