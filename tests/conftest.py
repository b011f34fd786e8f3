"""Shared fixtures: the real default model, loaded once per test session."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DEEPFLOW_CACHE", str(ROOT / ".venv" / "deepflow-cache"))

from flowserve.config import default_model_path  # noqa: E402
from flowserve.tokenizer import Tokenizer  # noqa: E402
from flowserve.weights import load_weights  # noqa: E402


@pytest.fixture(scope="session")
def model_path() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def weights(model_path):
    """(ModelConfig, tensors) of the default model, shared by every engine in the session."""
    return load_weights(model_path)


@pytest.fixture(scope="session")
def tokenizer(model_path) -> Tokenizer:
    return Tokenizer.load(model_path)


PROMPT = {"prompt": "The three primary colors are", "max_tokens": 24, "temperature": 0}


@pytest.fixture(scope="session")
def engine_greedy_reference(model_path, weights, tokenizer) -> str:
    """The in-process engine's greedy text for PROMPT: what every TE must give, on any host."""
    from flowserve.config import EngineConfig
    from flowserve.engine import Engine
    from flowserve.protocol import SamplingParams
    from flowserve.tokenizer import Detokenizer
    engine = Engine(model_path, EngineConfig(kv_cache_gb=0.1), weights=weights)
    prompt = tokenizer.encode(PROMPT["prompt"])
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=PROMPT["max_tokens"]))[0]
    return Detokenizer(tokenizer, prompt).push(out)
