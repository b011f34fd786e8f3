"""A LoRA adapter as PEFT saves it (`save_pretrained`): a directory with `adapter_config.json`
and `adapter_model.safetensors`, checked against the base model it is to run on.

Torch-free, so the main process can check an adapter it is asked to register (a bad one is
a 400 there, before any TE sees it) and name it: `LoraSpec.digest`, the sha256 of both
files, names an adapter by its content. A TE's slots hold adapters by digest, and the prefix
cache seeds a sequence's block chain hashes with it (`hash_seed`, `flowserve.rtc.prefix_blocks`),
so a reload under the same name with new weights never reuses the old adapter's KV, and
base and adapter never share KV. The tensors themselves are read by `flowserve.lora_slots`.

Each PEFT target module is one of the base's seven linears per layer, and `flowserve.model`
fuses some of them: q/k/v into `wqkv` and gate/up into `w_gate_up`. `MODULES` maps a module
to its fused linear and the slice of its output rows that the adapter's B adds into.
"""
import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from flowserve.config import ModelConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# PEFT module -> the fused linear of flowserve.model it is part of
MODULES = {"q_proj": "wqkv", "k_proj": "wqkv", "v_proj": "wqkv", "o_proj": "wo",
           "gate_proj": "w_gate_up", "up_proj": "w_gate_up", "down_proj": "w_down"}
_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
_DTYPES = {"F32", "F16", "BF16"}


@dataclass
class LoraSpec:
    path: str
    digest: str                   # sha256 (hex) of adapter_config.json + adapter_model.safetensors
    rank: int
    scale: float                  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    modules: list[str]            # the PEFT target modules it has tensors for, in MODULES order
    tensors: dict[str, tuple[int, str, str]]  # safetensors key -> (layer, module, "A" | "B")


def module_shape(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """(out, in) of one of the base's linears, unfused."""
    h, kv, mlp = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return {"q_proj": (cfg.num_heads * cfg.head_dim, h), "k_proj": (kv, h), "v_proj": (kv, h),
            "o_proj": (h, cfg.num_heads * cfg.head_dim), "gate_proj": (mlp, h), "up_proj": (mlp, h),
            "down_proj": (h, mlp)}[module]


def fused_slices(cfg: ModelConfig) -> dict[str, int]:
    """Each module's first output row in its fused linear (q, k, v in wqkv; gate, up in w_gate_up)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": 0, "k_proj": q, "v_proj": q + kv, "o_proj": 0,
            "gate_proj": 0, "up_proj": cfg.intermediate_size, "down_proj": 0}


def hash_seed(digest: str) -> int:
    """The prefix cache's chain-hash seed of a sequence with this adapter: a positive int (the
    base's chain starts from -1), the same in every process."""
    return int(digest[:15], 16)


def read_files(path: str) -> tuple[bytes, bytes]:
    """The adapter directory's two files, read once (their bytes are both checked and loaded)."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"LoRA adapter path {path!r} is not a directory "
                         f"(a PEFT adapter holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        return (root / CONFIG_FILE).read_bytes(), (root / WEIGHTS_FILE).read_bytes()
    except OSError as e:
        raise ValueError(f"LoRA adapter {path!r}: cannot read {Path(e.filename or '').name or 'its files'}: "
                         f"{e.strerror or e}") from None


def read_lora(path: str, cfg: ModelConfig, max_rank: int,
              files: tuple[bytes, bytes] | None = None) -> LoraSpec:
    """Check the PEFT adapter at `path` against the base model `cfg` without loading a tensor
    (only the safetensors header is parsed). ValueError saying what is wrong: an unreadable
    path, a malformed config, a rank above `max_rank`, modules the base does not have,
    tensors whose shapes do not match the base, or a PEFT feature this engine does not run."""
    config_bytes, weights_bytes = files or read_files(path)
    where = f"LoRA adapter {path!r}"
    try:
        conf = json.loads(config_bytes)
        if not isinstance(conf, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ValueError(f"{where}: malformed {CONFIG_FILE}: {e}") from None
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {conf['peft_type']!r} is not LORA")
    rank, alpha = conf.get("r"), conf.get("lora_alpha", conf.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{where}: malformed {CONFIG_FILE}: r must be a positive integer, not {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"{where}: malformed {CONFIG_FILE}: lora_alpha must be a number, not {alpha!r}")
    if rank > max_rank:
        raise ValueError(f"{where}: rank {rank} is above max_lora_rank {max_rank}")
    unsupported = [name for name, on in [
        (f"bias={conf.get('bias')!r}", conf.get("bias", "none") != "none"),
        ("use_dora", conf.get("use_dora")), ("modules_to_save", conf.get("modules_to_save")),
        ("rank_pattern", conf.get("rank_pattern")), ("alpha_pattern", conf.get("alpha_pattern")),
        ("fan_in_fan_out", conf.get("fan_in_fan_out")), ("lora_bias", conf.get("lora_bias"))] if on]
    if unsupported:
        raise ValueError(f"{where}: unsupported PEFT features: {', '.join(unsupported)}")
    targets = conf.get("target_modules")
    if isinstance(targets, list):  # a str is a regex over module names: the tensors say which
        missing = sorted(set(targets) - set(MODULES))
        if missing:
            raise ValueError(f"{where}: target modules the base does not have: {missing} "
                             f"(it has {sorted(MODULES)})")
    tensors = check_tensors(where, weights_bytes, cfg, rank)
    scale = alpha / rank ** 0.5 if conf.get("use_rslora") else alpha / rank
    digest = hashlib.sha256(config_bytes + weights_bytes).hexdigest()
    present = {module for _, module, _ in tensors.values()}
    return LoraSpec(path, digest, rank, float(scale), [m for m in MODULES if m in present], tensors)


def check_tensors(where: str, data: bytes, cfg: ModelConfig, rank: int) -> dict[str, tuple[int, str, str]]:
    """The safetensors header of `data`, each tensor checked against the base's shapes."""
    try:
        (size,) = struct.unpack_from("<Q", data)
        header = json.loads(data[8:8 + size])
    except (struct.error, ValueError) as e:
        raise ValueError(f"{where}: {WEIGHTS_FILE} is not a safetensors file: {e}") from None
    header.pop("__metadata__", None)
    tensors, seen = {}, set()
    for key, info in header.items():
        m = _KEY.fullmatch(key)
        if m is None or m[2] not in MODULES:
            raise ValueError(f"{where}: tensor {key!r} is not a LoRA A/B of a module the base has "
                             f"(it has {sorted(MODULES)} per layer)")
        layer, module, ab = int(m[1]), m[2], m[3]
        if layer >= cfg.num_layers:
            raise ValueError(f"{where}: tensor {key!r} is for layer {layer}; the base has {cfg.num_layers}")
        out, inp = module_shape(cfg, module)
        want = [rank, inp] if ab == "A" else [out, rank]
        if info.get("shape") != want:
            raise ValueError(f"{where}: {module} of layer {layer}: lora_{ab} has shape {info.get('shape')}, "
                             f"the base needs {want}")
        if info.get("dtype") not in _DTYPES:
            raise ValueError(f"{where}: tensor {key!r} has dtype {info.get('dtype')}; "
                             f"expected one of {sorted(_DTYPES)}")
        tensors[key] = (layer, module, ab)
        seen.add((layer, module, ab))
    for layer, module, ab in seen:
        if (layer, module, "B" if ab == "A" else "A") not in seen:
            raise ValueError(f"{where}: {module} of layer {layer} has lora_{ab} but not its pair")
    if not tensors:
        raise ValueError(f"{where}: {WEIGHTS_FILE} holds no LoRA tensors")
    return tensors
