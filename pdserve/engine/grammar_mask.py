"""The sampler's grammar step: forbid, in one batched op, every token a row's grammar
does not allow next (the rows without a grammar are left alone)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from pdserve.engine.request import Request


def apply_grammar_masks(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Set to -inf, in place, the logits of tokens each row's grammar forbids: xgrammar fills
    one int32 bitmask [N, ceil(vocab/32)] on the host (C++, per row) and applies it to the
    grammar rows of `logits` [N, vocab] in one kernel on their device."""
    rows = [i for i, r in enumerate(requests) if r.grammar is not None]
    if not rows:
        return
    import xgrammar as xgr

    vocab = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(len(requests), vocab)
    _batch_matcher().batch_fill_next_token_bitmask(
        [requests[i].grammar.matcher for i in rows], bitmask, indices=rows)
    if logits.is_cuda:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=rows)


@functools.cache
def _batch_matcher():
    """xgrammar's batch filler (one fill thread: the engine's CPU threads do the forward)."""
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher(max_threads=1)
