"""A tiny random-weight Llama as an HF directory, for tests that need a fast server, not a
sensible one (the OpenAPI fuzzing sends over a thousand requests).

Same tokenizer and chat template as the packaged SmolLM2 (so prompts, token ids and
context checks behave as in production), but hidden size 64 and 2 layers: a step costs
microseconds of compute. The text it generates is noise.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowserve.config import default_model_path
from flowserve.tokenizer import Tokenizer

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}


def write_tiny_model(path: Path, seed: int = 0) -> Path:
    """Create the directory `path` (it must not exist yet) with the real tokenizer's files,
    config.json and model.safetensors (float32, tied embeddings); return it."""
    tok = Tokenizer.load(default_model_path())
    tok.save(path)                              # tokenizer.json + tokenizer_config.json
    vocab, h, inter = tok.vocab_size, SHAPE["hidden_size"], SHAPE["intermediate_size"]
    head_dim = h // SHAPE["num_attention_heads"]
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
        "vocab_size": vocab, **SHAPE, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True,
        "bos_token_id": tok.bos_id, "eos_token_id": tok.backend.token_to_id(tok.eos_token)}))
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    kv = SHAPE["num_key_value_heads"] * head_dim
    tensors = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": torch.ones(h)}
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter)}
    save_file(tensors, str(path / "model.safetensors"))
    return path
