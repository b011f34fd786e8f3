"""Our tokenizer, chat template and streaming detokenizer (flowserve/tokenizer.py) against HF
transformers' tokenizer read from the same GGUF file, on text that is not plain ASCII."""
import random
from pathlib import Path

import pytest

from flowserve.tokenizer import Detokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Café naïve façade — déjà vu in Ærøskøbing, señor Müller.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 🎉👍🏽 👨‍👩‍👧 ❤️ 🇫🇷!",
    "def f(x):\n\treturn {'a': [1, 2], \"b\": x ** 2}  # ok\n",
    "a    b\n\n\n  c\t\t d   \n",
    "1234567890 3.14159 -42e10",
    "<|im_start|>user\nhi<|im_end|>",  # special tokens written in the text map to their ids
    " leading space and trailing ",
    "Ελληνικά, русский, עברית, العربية, हिन्दी",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Bonjour, ça va ? 你好 🎉"}],
    [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "¿Qué hora es?"}],
    [{"role": "user", "content": "Write `print('hi')` in Python."},
     {"role": "assistant", "content": "```python\nprint('hi')\n```"},
     {"role": "user", "content": "再见 👋"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(model_path):
    p = Path(model_path)
    return transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_hf(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tokenizer, hf_tokenizer, messages, add_generation_prompt):
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt)
    assert ours == hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
    ref_ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    assert tokenizer.encode(ours) == list(getattr(ref_ids, "input_ids", ref_ids))


def stream(tokenizer, prompt: list[int], out: list[int]) -> str:
    """What a client reads: the detokenizer pushed one id at a time, as a TE sends them."""
    detok = Detokenizer(tokenizer, prompt)
    return "".join(detok.push([i]) for i in out)


def test_streamed_text_is_the_full_decode_on_random_ids(tokenizer, hf_tokenizer):
    """Random ids, half of them pieces of multi-byte characters (the byte tokens that CJK and
    emoji split into): the streamed text is HF's decode of all of them, except when that ends
    in a character no later token completed: then the last tokens' text is held back (as
    vLLM's detokenizer does), and the rest is still exact."""
    rng = random.Random(0)
    pieces = sorted({i for t in TEXTS[1:3] + TEXTS[-1:] for i in hf_tokenizer.encode(t)})
    prompts = [[], hf_tokenizer.encode("Réponse : "), hf_tokenizer.encode("答案是")]
    held_back = 0
    for trial in range(300):
        out = [rng.choice(pieces) if rng.random() < 0.5 else rng.randrange(tokenizer.vocab_size)
               for _ in range(rng.randrange(1, 40))]
        prompt = prompts[trial % len(prompts)]
        full = hf_tokenizer.decode(prompt + out, skip_special_tokens=True)[len(hf_tokenizer.decode(prompt)):]
        text = stream(tokenizer, prompt, out)
        if text != full:
            held_back += 1
            assert full.endswith("\ufffd") and full.startswith(text), (prompt, out)
            assert len(full) - len(text) <= len(hf_tokenizer.decode(out[-4:])), (prompt, out)
    assert held_back < 100  # most streams end on a whole character and compare exactly


def test_streamed_multibyte_text_round_trips(tokenizer):
    for text in TEXTS:
        if "<|" not in text:
            assert stream(tokenizer, [], tokenizer.encode(text)) == text
