"""PEFT-format LoRA adapters with random weights, written in milliseconds (no peft model built):
what the server tests register with `--lora-modules` and `/v1/load_lora_adapter`. The engine's
agreement with transformers + peft on adapters made by peft itself is tests/test_lora.py's."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowserve.config import ModelConfig
from flowserve.lora import module_shape

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(path: Path, cfg: ModelConfig, seed: int, rank: int = 8, targets: list[str] = ALL,
                  alpha: int = 16, config: dict | None = None) -> Path:
    """A rank-`rank` adapter over the model of `cfg` at `path` (created), A and B random and
    large enough to change greedy answers. `config`: keys to put in adapter_config.json."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module in targets:
            out, inp = module_shape(cfg, module)
            kind = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{kind}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.1
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
        **(config or {})}))
    return path
