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
