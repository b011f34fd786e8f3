"""Structured outputs: a JSON Schema compiled into a grammar (llguidance), and one matcher per
sequence that says which tokens may come next.

The main process checks a request's schema with `schema_error` (no tokenizer needed) before any
TE sees it. In a TE the engine makes a `Grammar` for each sequence whose
`SamplingParams.json_schema` is set (`Grammars.new`, compiled once per schema text and
tokenizer), the sampler (`flowserve/sampler.py`) asks it for a token bitmask each step
(`fill`), and the matcher consumes the sequence's generated tokens as they become known
(`catch_up`: idempotent, so the PD decode TE starting from the prefill TE's first token, or an
async step that needs the token still being resolved, bring it up to date the same way). When
the grammar is complete (`done`) the sequence ends. Torch-free: the main process imports it too.
"""
import ctypes
import json
from dataclasses import dataclass
from functools import lru_cache

import llguidance

# Compact JSON (", " and ": ", no other whitespace): a small model cannot wander into endless
# blank lines, and the object ends where its last brace does.
OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
JSON_OBJECT = '{"type": "object"}'   # response_format {"type": "json_object"}: any JSON object
MAX_CACHED = 256                     # compiled schemas kept per tokenizer
BYTES = llguidance.LLTokenizer("byte")  # a 256-token tokenizer: checks a schema fast, with no model's


def compile_schema(schema: str) -> str:
    """llguidance's grammar for a JSON Schema's text; ValueError if it is no JSON."""
    try:
        json.loads(schema)
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=OPTIONS)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"invalid JSON schema: {e}") from None


def schema_error(schema: str) -> str | None:
    """What llguidance cannot compile in `schema` (unknown types, bad $refs or patterns, a
    schema no value satisfies, ...); None if it compiles. The main process's check: milliseconds,
    no model's tokenizer; a first mask computed, since some errors show only then."""
    try:
        matcher = llguidance.LLMatcher(BYTES, compile_schema(schema), log_level=0)
    except ValueError as e:
        return str(e)
    if not matcher.is_error():
        matcher.compute_bitmask()
    return " ".join(matcher.get_error().split("<state>")[0].split()) or None  # without the parser's state dump


@dataclass
class Grammar:
    """One sequence's matcher, and how many of its generated tokens it has consumed."""
    matcher: llguidance.LLMatcher
    consumed: int = 0

    def catch_up(self, generated: list[int]) -> None:
        """Consume the generated tokens it has not seen yet. A token the mask did not allow (a
        row discarded after the grammar ended) puts it in an error state: `done`, no harm."""
        for token in generated[self.consumed:]:
            self.matcher.consume_token(token)
        self.consumed = max(self.consumed, len(generated))

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return self.matcher.is_stopped()

    def fill(self, address: int, num_bytes: int) -> None:
        """Write the next token's bitmask (bit t of 32-bit word t // 32: token t allowed) at `address`."""
        self.matcher.unsafe_compute_mask_ptr(address, num_bytes)
        if self.matcher.is_error():  # a parser limit hit: every token allowed, and the row ends (`done`)
            ctypes.memset(address, 0xFF, num_bytes)


class Grammars:
    """A TE's compiled grammars for one tokenizer (`tokenizer_json`: a `tokenizers` tokenizer's
    JSON), padded to the model's vocabulary; the end tokens are the model's EOS ids."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int]):
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_ids)
        self.compiled = lru_cache(MAX_CACHED)(self.compile)

    def compile(self, schema: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, compile_schema(schema), log_level=0)
        if not matcher.is_error():
            matcher.compute_bitmask()  # builds the lexer once, for every copy; and some errors show only now
        if matcher.is_error():
            raise ValueError(f"invalid JSON schema: {matcher.get_error()}")
        return matcher

    def new(self, schema: str) -> Grammar:
        """A fresh matcher for `schema` (a copy of the cached compiled one); ValueError if it does not compile."""
        return Grammar(self.compiled(schema).deep_copy())
