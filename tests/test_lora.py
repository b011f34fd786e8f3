"""LoRA adapters in the engine (flowserve/lora.py, flowserve/lora_slots.py): adapters made here
with peft on the HF model transformers reads from the default GGUF, random non-zero B. Their
greedy tokens equal transformers + peft's, one step mixes adapters and the base row by row,
a reload under the same name never reuses the old KV, a bad adapter is refused with its
reason, and more adapters than slots wait and evict least recently used first."""
import json
from pathlib import Path

import pytest
import torch

from flowserve.config import EngineConfig
from flowserve.engine import Engine
from flowserve.lora import read_lora
from flowserve.protocol import Adapter, SamplingParams

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child."]


@pytest.fixture(scope="module")
def hf_model(model_path):
    p = Path(model_path)
    return transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference: argmax of the logits, step by step (transformers' own KV cache)."""
    out, tokens = None, []
    with torch.no_grad():
        for _ in range(n):
            inputs = torch.tensor([prompt if out is None else tokens[-1:]])
            out = model(inputs, past_key_values=out and out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def make_adapter(hf_model, path: Path, seed: int, prompts: list[list[int]], targets=ALL, alpha: int = 16
                 ) -> tuple[Adapter, list[list[int]]]:
    """A rank-8 PEFT adapter with random A and B saved at `path`, and transformers + peft's
    greedy tokens for `prompts` with it. The base model is left as it was."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=8, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(hf_model, config)
    model.save_pretrained(str(path))
    refs = [greedy(model, p, GREEDY.max_tokens) for p in prompts]
    model.unload()  # the LoRA layers out again: the base as it was
    return Adapter(path.name, str(path), read_lora(str(path), read_config(hf_model), 64).digest), refs


def read_config(hf_model):
    from flowserve.config import config_from_hf
    return config_from_hf(hf_model.config.to_dict(), "ref")


@pytest.fixture(scope="module")
def adapters(hf_model, prompts, tmp_path_factory) -> dict[str, tuple[Adapter, list[list[int]]]]:
    root = tmp_path_factory.mktemp("adapters")
    made = {f"a{i}": make_adapter(hf_model, root / f"a{i}", i, prompts) for i in range(1, 4)}
    made["qv"] = make_adapter(hf_model, root / "qv", 4, prompts, targets=["q_proj", "v_proj"], alpha=32)
    return made


@pytest.fixture(scope="module")
def base_tokens(model_path, weights, prompts) -> list[list[int]]:
    return Engine(model_path, EngineConfig(kv_cache_gb=0.1), weights=weights).generate(prompts, GREEDY)


def run(eng: Engine, rid: str, prompt: list[int], adapter: Adapter | None) -> tuple[list[int], int]:
    """One request alone: its tokens and the prompt tokens its prefix cache served."""
    eng.add_request(rid, prompt, GREEDY, adapter=adapter)
    tokens, cached = [], 0
    while eng.has_work():
        for out in eng.step():
            tokens += out.token_ids
            cached = out.num_cached
    return tokens, cached


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["fast", "plain"])
def test_adapter_tokens_equal_peft_reference(model_path, weights, prompts, adapters, base_tokens, cpu_kernels):
    eng = Engine(model_path, EngineConfig(kv_cache_gb=0.1, cpu_kernels=cpu_kernels), weights=weights)
    for name, (adapter, refs) in adapters.items():
        for i, prompt in enumerate(prompts):
            tokens, _ = run(eng, f"{name}-{i}", prompt, adapter)
            assert tokens == refs[i], f"{name}, prompt {i}"
        assert all(refs[i] != base_tokens[i] for i in range(len(prompts))), f"{name} changes nothing"


def test_one_batch_mixes_adapters_and_base(model_path, weights, prompts, adapters, base_tokens):
    eng = Engine(model_path, EngineConfig(kv_cache_gb=0.1), weights=weights)
    mix = [adapters["a1"][0], adapters["a2"][0], None, adapters["qv"][0]]
    rows = [(p, a) for p in prompts for a in mix]
    steps = []
    schedule = eng.batcher.schedule
    eng.batcher.schedule = lambda: steps.append(w := schedule()) or w
    out = eng.generate([p for p, _ in rows], GREEDY, [a for _, a in rows])
    assert len(steps[0]) == len(rows)  # every row in the first step: one forward mixes them
    for (p, a), tokens in zip(rows, out):
        i = prompts.index(p)
        want = base_tokens[i] if a is None else adapters[Path(a.path).name][1][i]
        assert tokens == want, f"{a and a.name}, prompt {i}"


def test_reload_same_name_new_weights_reuses_no_kv(model_path, weights, prompts, base_tokens, hf_model, tmp_path):
    eng = Engine(model_path, EngineConfig(kv_cache_gb=0.1), weights=weights)
    old, old_refs = make_adapter(hf_model, tmp_path / "mine", 11, prompts[:1])
    prompt = prompts[0]
    assert run(eng, "old", prompt, old) == (old_refs[0], 0)
    tokens, cached = run(eng, "old-again", prompt, old)
    assert tokens == old_refs[0] and cached > 0  # the adapter's own KV is reused
    assert run(eng, "base", prompt, None) == (base_tokens[0], 0)  # base and adapter share no KV
    new, new_refs = make_adapter(hf_model, tmp_path / "mine", 12, prompts[:1])  # same name, new weights
    assert new.name == old.name and new.digest != old.digest
    tokens, cached = run(eng, "new", prompt, new)
    assert tokens == new_refs[0] != old_refs[0]
    assert cached == 0  # none of the old adapter's KV
    # the old digest no longer matches the files: refused, never run with the new weights
    fresh = Engine(model_path, EngineConfig(kv_cache_gb=0.1), weights=weights)
    with pytest.raises(ValueError, match="changed since it was registered"):
        fresh.add_request("stale", prompt, GREEDY, adapter=old)


def edit_config(src: Path, dst: Path, **changes) -> str:
    """A copy of the adapter at `src` with its adapter_config.json changed."""
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    conf = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**conf, **changes}))
    return str(dst)


def test_bad_adapters_are_refused_with_their_reason(model_path, weights, adapters, tmp_path):
    from safetensors.torch import load_file, save_file
    cfg = weights[0]
    good = Path(adapters["a1"][0].path)
    (tmp_path / "malformed").mkdir()
    (tmp_path / "malformed" / "adapter_config.json").write_text("{not json")
    (tmp_path / "malformed" / "adapter_model.safetensors").write_bytes(b"")
    shapes = tmp_path / "shapes"
    edit_config(good, shapes)
    tensors = load_file(str(good / "adapter_model.safetensors"))
    key = next(k for k in tensors if "layers.3.self_attn.q_proj.lora_B" in k)
    tensors[key] = torch.zeros(100, 8)
    save_file(tensors, str(shapes / "adapter_model.safetensors"))
    no_weights = edit_config(good, tmp_path / "nofile")
    (tmp_path / "nofile" / "adapter_model.safetensors").unlink()
    cases = [
        (str(tmp_path / "nowhere"), "is not a directory"),
        (no_weights, "cannot read adapter_model.safetensors"),
        (str(tmp_path / "malformed"), "malformed adapter_config.json"),
        (edit_config(good, tmp_path / "rank", r=128), "rank 128 is above max_lora_rank 64"),
        (edit_config(good, tmp_path / "embed", target_modules=["q_proj", "embed_tokens"]),
         r"target modules the base does not have: \['embed_tokens'\]"),
        (str(shapes), r"q_proj of layer 3: lora_B has shape \[100, 8\], the base needs \[576, 8\]"),
        (edit_config(good, tmp_path / "bias", bias="all"), "unsupported PEFT features: bias='all'"),
        (edit_config(good, tmp_path / "dora", use_dora=True), "unsupported PEFT features: use_dora"),
        (edit_config(good, tmp_path / "save", modules_to_save=["lm_head"]),
         "unsupported PEFT features: modules_to_save"),
    ]
    eng = Engine(model_path, EngineConfig(kv_cache_gb=0.1), weights=weights)
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            read_lora(path, cfg, 64)
        with pytest.raises(ValueError, match=message):  # the engine refuses the request, and holds nothing
            eng.add_request("bad", [1, 2, 3], GREEDY, adapter=Adapter("bad", path, ""))
    assert not eng.seqs and not eng.lora.host
    assert eng.generate([[1, 2, 3]], GREEDY)  # and keeps serving


def test_more_adapters_than_slots_wait_and_evict_lru(model_path, weights, prompts, adapters):
    eng = Engine(model_path, EngineConfig(kv_cache_gb=0.1, max_loras=2, max_cpu_loras=8), weights=weights)
    a1, a2, a3, qv = (adapters[n][0] for n in ("a1", "a2", "a3", "qv"))
    prompt = prompts[0]
    for rid, adapter in [("1", a1), ("2", a2), ("1b", a1)]:
        assert run(eng, rid, prompt, adapter)[0] == adapters[Path(adapter.path).name][1][0]
    stats = eng.stats()
    assert stats.lora_slot_loads == 2 and stats.lora_disk_loads == 2  # a1 again: in its slot still
    run(eng, "3", prompt, a3)  # evicts a2, the least recently used
    assert sorted(eng.stats().lora_slots) == sorted([a1.digest, a3.digest])
    run(eng, "2b", prompt, a2)  # back from host memory, not disk
    stats = eng.stats()
    assert stats.lora_slot_loads == 4 and stats.lora_disk_loads == 3
    # four adapters and the base at once on two slots: the rows whose adapter has no slot wait,
    # no slot in use is taken from under a running sequence, and every row gets its own tokens
    loaded = []
    load = eng.lora.load
    eng.lora.load = lambda slot, adapter, w: (loaded.append((slot, set(eng.lora.slots), list(eng.lora.refs))),
                                              load(slot, adapter, w))
    mix = [a1, a2, a3, qv, None]
    out = eng.generate([prompt] * len(mix), GREEDY, mix)
    for adapter, tokens in zip(mix, out):
        want = None if adapter is None else adapters[Path(adapter.path).name][1][0]
        assert adapter is None or tokens == want, adapter.name
    assert loaded and all(refs[slot] == 0 for slot, _, refs in loaded)
    assert eng.lora.refs == [0, 0] and not eng.seqs


def test_tp3_shards_adapters(model_path, weights, prompts, adapters, base_tokens):
    """TP: each executor holds its shard of every adapter (B split for q/k/v and gate/up, A for
    o and down) and a step mixes adapters and the base as at TP=1."""
    eng = Engine(model_path, EngineConfig(kv_cache_gb=0.1, tensor_parallel_size=3), weights=weights)
    try:
        mix = [adapters["a1"][0], None, adapters["qv"][0]]
        out = eng.generate([prompts[1]] * 3, GREEDY, mix)
        assert out == [adapters["a1"][1][1], base_tokens[1], adapters["qv"][1][1]]
    finally:
        eng.runner.close()
