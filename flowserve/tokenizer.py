"""Tokenizer, chat template and incremental detokenizer.

An independent module (the paper's tokenizer runs apart from the engine): in the server it
lives in the main process with the JE, so TEs see token ids only. Sources, in the order
they are looked for:
- GGUF metadata: the BPE vocabulary and merges (`tokenizer.ggml.*`), rebuilt with the
  `tokenizers` library, and `tokenizer.chat_template`;
- an HF directory: tokenizer.json (or sentencepiece tokenizer.model) and the chat template
  in tokenizer_config.json.
`Detokenizer` turns a growing list of ids into text deltas that never split a UTF-8
character.
"""
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from jinja2 import meta
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# llama.cpp's pre-tokenizer names -> how the text is split before BPE.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt
    if pre in ("smollm", "starcoder", "refact"):
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
    if pre in ("llama-bpe", "llama3"):
        return pt.Sequence([pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pt.ByteLevel(add_prefix_space=False)  # gpt2 and its many close cousins


@dataclass
class Tokenizer:
    backend: object                   # tokenizers.Tokenizer or sentencepiece.SentencePieceProcessor
    chat_template: str | None
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False
    bos_id: int | None = None
    texts: dict[int, str] = field(default_factory=dict, repr=False, compare=False)  # `token_text`'s, cached

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, model_path: str) -> "Tokenizer":
        """From an HF dir, or from a GGUF file via its cached conversion to an HF dir
        (parsing GGUF metadata takes seconds; reading tokenizer.json, milliseconds)."""
        if Path(model_path).is_dir():
            return cls.from_hf_dir(model_path)
        from flowserve.config import cache_path
        cached = cache_path(model_path, "tokenizer")
        if not (cached / "tokenizer_config.json").exists():
            cls.from_gguf(model_path).save(cached)
        return cls.from_hf_dir(str(cached))

    def save(self, path: Path) -> None:
        """Write as an HF tokenizer dir (tokenizer.json + tokenizer_config.json)."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "chat_template": self.chat_template, "bos_token": self.bos_token,
            "eos_token": self.eos_token, "add_bos_token": self.add_bos}))
        tmp.replace(path)

    @classmethod
    def from_gguf(cls, path: str) -> "Tokenizer":
        from gguf import GGUFReader
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as HFTokenizer

        fields = GGUFReader(path).fields

        def get(key, default=None):
            return fields[key].contents() if key in fields else default

        if get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"GGUF tokenizer {get('tokenizer.ggml.model')!r} unsupported (BPE 'gpt2' only)")
        tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
        tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        tok.pre_tokenizer = _pre_tokenizer(get("tokenizer.ggml.pre", "gpt2"))
        tok.decoder = decoders.ByteLevel()
        # token type 3 = control (<|im_start|>, <|endoftext|>, ...): matched whole, skipped on decode
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3])
        bos, eos = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
        return cls(tok, get("tokenizer.chat_template"),
                   bos_token=tokens[bos] if bos is not None else "",
                   eos_token=tokens[eos] if eos is not None else "",
                   add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
                   bos_id=bos)

    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        root = Path(path)
        conf_file = root / "tokenizer_config.json"
        conf = json.loads(conf_file.read_text()) if conf_file.exists() else {}

        def token_str(v):  # tokenizer_config stores a token as a string or an AddedToken dict
            return v.get("content", "") if isinstance(v, dict) else (v or "")

        if (root / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer
            backend = HFTokenizer.from_file(str(root / "tokenizer.json"))
            tok_id = backend.token_to_id
        else:
            import sentencepiece as spm
            backend = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
            tok_id = lambda t: backend.piece_to_id(t) if t else None  # noqa: E731
        bos, eos = token_str(conf.get("bos_token")), token_str(conf.get("eos_token"))
        template = conf.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, template, bos_token=bos, eos_token=eos,
                   add_bos=bool(conf.get("add_bos_token", False)), bos_id=tok_id(bos) if bos else None)

    # ---------------------------------------------------------------- use

    @property
    def is_sentencepiece(self) -> bool:
        return not hasattr(self.backend, "encode_batch")

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. <|im_start|>) map to their ids."""
        if self.is_sentencepiece:
            ids = self.backend.encode(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        if self.is_sentencepiece:
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's text as logprobs show it, special tokens included (a token that is part of
        a UTF-8 character shows U+FFFD)."""
        if token_id not in self.texts:
            self.texts[token_id] = (self.backend.id_to_piece(token_id).replace("\u2581", " ") if self.is_sentencepiece
                                    else self.backend.decode([token_id], skip_special_tokens=False))
        return self.texts[token_id]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_piece_size() if self.is_sentencepiece else self.backend.get_vocab_size()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """`messages` and `tools` in transformers' shapes (tool calls' arguments as objects)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        return _compile(self.chat_template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token)

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders `tools` itself (else the caller puts them in the messages)."""
        return bool(self.chat_template) and _takes_tools(self.chat_template)

    def encode_chat_for_training(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """A fine-tuning example (flowserve/train.py): the chat's token ids and a mask, 1 on
        the tokens the loss counts: each assistant message's (its end-of-turn included) unless
        its `weight` is 0. Each assistant reply is what the template adds past the prompt that
        asks for it, so the text is rendered in pieces: the template must extend its own
        renderings (ValueError if it does not)."""
        ids: list[int] = []
        mask: list[int] = []
        done = ""  # the text encoded so far
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.apply_chat_template(messages[:i], add_generation_prompt=True)
            full = self.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
            for text, counted in ((prompt[len(done):], 0), (full[len(prompt):], m.get("weight", 1) != 0)):
                piece = self.encode(text, add_bos=None if not ids else False)  # a BOS once, first
                ids += piece
                mask += [int(counted)] * len(piece)
            done = full
        return ids, mask


def _raise_exception(message):
    raise TemplateError(message)


# Sandboxed, as HF does, since templates ship with model files.
_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
_ENV.globals["raise_exception"] = _raise_exception


@cache
def _compile(source: str):
    return _ENV.from_string(source)


@cache
def _takes_tools(source: str) -> bool:
    return "tools" in meta.find_undeclared_variables(_ENV.parse(source))


class Detokenizer:
    """Text deltas for a growing token list. Decodes a short window of recent tokens
    (so byte-level and sentencepiece spacing come out right) and holds back text that ends
    in an incomplete UTF-8 sequence until the next token completes it."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None):
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-4:]) if prompt_ids else []
        self.prefix = 0                  # window start
        self.read = len(self.ids)        # ids before this are already emitted

    def push(self, new_ids: list[int]) -> str:
        self.ids += new_ids
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""  # an incomplete character, or a token that adds nothing yet
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]
