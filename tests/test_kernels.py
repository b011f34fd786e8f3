"""The CPU fast path (flowserve/kernels.cpp and oneDNN-packed linears) against the plain
torch path it replaces, which stays in flowserve/model.py as its reference."""
import pytest
import torch
import torch.nn.functional as F

from flowserve import kernels
from flowserve.config import EngineConfig, ModelConfig
from flowserve.engine import Engine
from flowserve.model import PACK_BATCH, apply_rope, attend, gather_blocks, pack_linears, rope_tables
from test_engine import GREEDY, random_prompts

H, KVH, D = 9, 3, 64  # SmolLM2-135M's attention: 9 query heads share 3 KV heads


def test_kernels_are_built():
    # `make install` builds them; without them the server silently runs the slower path
    assert kernels.available()


def test_rope_rotates_q_and_k_in_place_like_the_reference():
    cfg = ModelConfig(vocab_size=8, hidden_size=H * D, intermediate_size=8, num_layers=1,
                      num_heads=H, num_kv_heads=KVH, head_dim=D)
    cos, sin = rope_tables(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    qkv = torch.randn(37, (H + 2 * KVH) * D)
    pos = torch.randint(0, cfg.max_position, (37,))
    x = qkv.clone()
    torch.ops.deepflow.rope_(x, pos, cos, sin, H + KVH, D)
    q_ref = apply_rope(qkv[:, :H * D].view(-1, H, D), cos[pos], sin[pos])
    k_ref = apply_rope(qkv[:, H * D:(H + KVH) * D].view(-1, KVH, D), cos[pos], sin[pos])
    torch.testing.assert_close(x[:, :H * D].view(-1, H, D), q_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(x[:, H * D:(H + KVH) * D].view(-1, KVH, D), k_ref, rtol=0, atol=1e-5)
    assert torch.equal(x[:, (H + KVH) * D:], qkv[:, (H + KVH) * D:])  # v untouched


@pytest.mark.parametrize("lens", [[1, 16, 17, 300], [450] * 32])
def test_paged_decode_attention_matches_the_gather_path(lens):
    torch.manual_seed(1)
    num_blocks, bs, b = 1024, 16, len(lens)
    k_cache, v_cache = torch.randn(KVH, num_blocks, bs, D), torch.randn(KVH, num_blocks, bs, D)
    lens = torch.tensor(lens)
    width = -(-int(lens.max()) // bs)
    tables = torch.randperm(num_blocks)[:b * width].view(b, width)
    q = torch.randn(b, (H + 2 * KVH) * D)[:, :H * D].view(b, H, D)  # strided, as in the model
    out = torch.empty(b, H, D)
    torch.ops.deepflow.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, D ** -0.5)
    k, v = gather_blocks(k_cache, tables), gather_blocks(v_cache, tables)
    mask = torch.arange(k.shape[2])[None, :] < lens[:, None]
    ref = attend(q.reshape(b, KVH, H // KVH, D).transpose(0, 1), k, v, mask[None, :, None, :], D ** -0.5)
    torch.testing.assert_close(out, ref.transpose(0, 1).reshape(b, H, D), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 7, PACK_BATCH, 300])
def test_packed_linear_matches_plain(rows):
    torch.manual_seed(2)
    w, x = torch.randn(1536, 576), torch.randn(rows, 576)
    y = torch.ops.mkldnn._linear_pointwise(x, pack_linears({"w": w})["w"], None, "none", [], "")
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_fast_path_gives_the_reference_logits_and_tokens(model_path, weights):
    """Prefill and decode logits of the real model within float32 rounding of the plain
    torch path (relative 1e-5 of the logits' scale), and the same greedy tokens, chunked
    prefill included."""
    prompts = random_prompts(6, 5, 120, seed=3)
    engines = {fast: Engine(model_path, EngineConfig(num_kv_blocks=128, cpu_kernels=fast), weights=weights)
               for fast in (False, True)}
    assert engines[True].runner.model.kernels and engines[True].runner.model.packed
    assert not engines[False].runner.model.kernels and engines[False].runner.model.packed is None
    logits = {}
    for fast, eng in engines.items():
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, GREEDY)
        work = eng.batcher.schedule()  # every prompt's prefill
        prefill, _ = eng.runner.run(work)
        for seq, n in work:  # the same next token in both engines, so the decode inputs match
            seq.num_computed += n
            seq.token_ids.append(42)
        decode, _ = eng.runner.run(eng.batcher.schedule())
        logits[fast] = torch.cat([prefill, decode])
    scale = logits[False].abs().max()
    assert (logits[True] - logits[False]).abs().max() / scale < 1e-5
    assert torch.equal(logits[True].argmax(-1), logits[False].argmax(-1))
    for eng in engines.values():
        for i in range(len(prompts)):
            eng.abort(str(i))
        eng.cfg.max_num_batched_tokens = 48  # chunked prefills: attention over a cached part too
    tokens = [eng.generate(prompts, GREEDY) for eng in engines.values()]
    assert tokens[0] == tokens[1]
