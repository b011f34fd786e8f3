"""Our forward pass against HF transformers reading the same GGUF file (float32)."""
import pytest
import torch

from flowserve.sequence import Sequence
from flowserve.config import EngineConfig
from flowserve.engine import Engine
from flowserve.protocol import SamplingParams

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_model(model_path):
    from pathlib import Path
    p = Path(model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    return model.eval()


def test_logits_match_hf_prompt_and_decode(model_path, weights, hf_model):
    # Small blocks so the 8 decode steps cross block boundaries of the paged cache.
    eng = Engine(model_path, EngineConfig(block_size=4, num_kv_blocks=64), weights=weights)
    prompt = [1, 504, 3458, 282, 4649, 314, 253, 1345, 1165, 30, 216, 339, 2120]
    seq = Sequence("ref", list(prompt), len(prompt), SamplingParams(temperature=0))
    n = len(prompt)
    for _ in range(9):  # the prompt, then 8 decode steps
        assert eng.rtc.alloc_blocks(seq, n)
        ours, _ = eng.runner.run([(seq, n)])
        seq.num_computed += n
        with torch.no_grad():
            ref = hf_model(torch.tensor([seq.token_ids])).logits[0, -1]
        rel = (ours[0] - ref).norm() / ref.norm()
        assert rel < 1e-4, f"relative error {rel:.2e} at length {len(seq.token_ids)}"
        seq.token_ids.append(int(ref.argmax()))
        n = 1
