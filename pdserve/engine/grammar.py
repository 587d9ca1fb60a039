"""Structured output: a request's grammar, compiled against the model's vocabulary, and the
per-request matcher that says which tokens may come next.

The grammar engine is xgrammar (PyPI): it compiles JSON schemas, regexes and EBNF into a
pushdown automaton with a precomputed token-mask cache, fills a request's allowed tokens
as a bitmask in C++ (no Python loop over the vocabulary) and applies the masks of a whole
batch to the logits in one kernel, on CPU and on CUDA.
"""

from __future__ import annotations

import concurrent.futures
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import xgrammar

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "ebnf"]
COMPILE_TIMEOUT_S = 10.0  # a grammar slower to compile than this is refused
COMPILE_CACHE_BYTES = 256 * 2**20  # xgrammar's LRU cache of compiled grammars
ANY_OBJECT = '{"type": "object"}'


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match, as the client gave it (the server checked it parses).
    `text` is a JSON schema, a regex, an EBNF grammar, or for `choice` a JSON list of strings."""

    kind: GrammarKind
    text: str = ""

    def grammar(self) -> xgrammar.Grammar:
        """Parse without a vocabulary; raises RuntimeError/ValueError if it is invalid."""
        import xgrammar as xgr

        if self.kind == "json_schema":
            return xgr.Grammar.from_json_schema(self.text, any_whitespace=False)
        if self.kind == "json_object":
            return xgr.Grammar.from_json_schema(ANY_OBJECT, any_whitespace=False)
        if self.kind == "regex":
            return xgr.Grammar.from_regex(self.text)
        if self.kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(json.loads(self.text)))
        return xgr.Grammar.from_ebnf(self.text)


def choice_ebnf(choices: list[str]) -> str:
    """One of the strings exactly: EBNF literals take JSON's escapes."""
    return "root ::= " + " | ".join(f"({json.dumps(c, ensure_ascii=False)})" for c in choices)


def check_grammar(spec: GrammarSpec) -> None:
    """Raise ValueError naming the problem if `spec` does not parse as its kind."""
    try:
        spec.grammar()
    except Exception as exc:  # xgrammar raises RuntimeError with the parser's message
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise ValueError(f"invalid {spec.kind.replace('_', ' ')}: {message}") from exc


class GrammarCompiler:
    """Compiles specs against one vocabulary, with a bounded LRU cache (xgrammar's own) and
    a time limit; builds the per-request matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=stop_token_ids)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=1,
                                             cache_limit_bytes=COMPILE_CACHE_BYTES)
        # a compile that overruns its limit finishes in the background; a second worker
        # keeps one such compile from stalling every later one
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="grammar")

    def compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        """The compiled grammar; ValueError if it is invalid or too slow to compile."""
        future = self._pool.submit(self._compile, spec)
        try:
            return future.result(timeout=COMPILE_TIMEOUT_S)
        except concurrent.futures.TimeoutError as exc:
            raise ValueError(f"the {spec.kind} grammar took over {COMPILE_TIMEOUT_S:.0f} s "
                             "to compile; simplify it") from exc
        except RuntimeError as exc:
            raise ValueError(f"invalid {spec.kind}: {exc}") from exc

    def _compile(self, spec: GrammarSpec) -> xgrammar.CompiledGrammar:
        c = self._compiler
        if spec.kind == "json_schema":
            return c.compile_json_schema(spec.text, any_whitespace=False)
        if spec.kind == "json_object":
            return c.compile_json_schema(ANY_OBJECT, any_whitespace=False)
        if spec.kind == "regex":
            return c.compile_regex(spec.text)
        if spec.kind == "choice":
            return c.compile_grammar(choice_ebnf(json.loads(spec.text)))
        return c.compile_grammar(spec.text)

    def matcher(self, spec: GrammarSpec, output_token_ids: list[int]) -> RequestGrammar:
        """A fresh matcher advanced over the tokens already generated (D: P's first token;
        a resumed request: what another instance generated)."""
        import xgrammar as xgr

        grammar = RequestGrammar(xgr.GrammarMatcher(self.compile(spec)))
        for token in output_token_ids:
            if grammar.terminated or not grammar.matcher.accept_token(token):
                raise ValueError(f"the output already generated (token {token}) does not "
                                 f"match the request's {spec.kind}")
        return grammar


@dataclass
class RequestGrammar:
    """One request's position in its grammar; advanced by each token it is given."""

    matcher: xgrammar.GrammarMatcher

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def advance(self, token: int) -> bool:
        """Take the sampled token; True once the grammar is complete (its stop token taken)
        or cannot go on, i.e. the request must stop."""
        return not self.matcher.accept_token(token) or self.matcher.is_terminated()
