"""Turns a batch of logits into next tokens, one row per sampling request.

Order, as in vLLM: penalties, then logit_bias, then min-tokens masking, then the
grammar's mask (structured output), then temperature, top-k, top-p and min-p, then a
draw. Logprobs are those of the raw model distribution. A request with a seed draws
counter-based noise (engine/seeded_noise.py), a function of (seed, prompt, position):
its tokens depend neither on its batch neighbours nor on the instance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.engine.grammar_mask import apply_grammar_masks
from pdserve.engine.host_to_device import to_device
from pdserve.engine.outputs import TokenLogprob
from pdserve.engine.request import Request
from pdserve.engine.seeded_noise import exponential_noise, prompt_digest, row_key


def _penalize(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    for row, req in enumerate(requests):
        p = req.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.all_token_ids)), device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if (p.frequency_penalty or p.presence_penalty) and req.output_token_ids:
            out = torch.tensor(req.output_token_ids, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def _add_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> None:
    """Every biased row's entries in one scatter-add; nothing here reads the device."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for row, req in enumerate(requests):
        bias = req.params.logit_bias
        if bias:
            rows += [row] * len(bias)
            cols += bias.keys()
            vals += bias.values()
    if rows:
        index = to_device(rows + cols, torch.long, logits.device).view(2, -1)
        logits.index_put_((index[0], index[1]),
                          to_device(vals, logits.dtype, logits.device), accumulate=True)


def _mask_stops_before_min_tokens(
    logits: torch.Tensor, requests: Sequence[Request], eos_token_ids: Sequence[int]
) -> None:
    for row, req in enumerate(requests):
        if len(req.output_token_ids) < req.params.min_tokens:
            banned = list(req.params.stop_token_ids)
            if not req.params.ignore_eos:
                banned += list(eos_token_ids)
            if banned:
                logits[row, banned] = float("-inf")


def _filter(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Apply temperature, top-k, top-p and min-p; returns probabilities."""
    device = logits.device
    temps = to_device([max(r.params.temperature, 1e-5) for r in requests], logits.dtype, device)
    logits = logits / temps[:, None]
    top_k = [r.params.top_k for r in requests]
    if any(k > 0 for k in top_k):
        vocab = logits.shape[1]
        k = to_device([k if 0 < k < vocab else vocab for k in top_k], torch.long, device)
        kth = logits.sort(dim=1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=1)
    # decide from the params on the host: a check of a device tensor would wait for the GPU
    if any(r.params.top_p < 1.0 for r in requests):
        top_p = to_device([r.params.top_p for r in requests], probs.dtype, device)
        sorted_probs, order = probs.sort(dim=1, descending=True)
        before = sorted_probs.cumsum(dim=1) - sorted_probs  # mass strictly above each token
        drop_sorted = before > top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if any(r.params.min_p > 0 for r in requests):
        min_p = to_device([r.params.min_p for r in requests], probs.dtype, device)
        threshold = probs.max(dim=1, keepdim=True).values * min_p[:, None]
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=1, keepdim=True)


def _draw(probs: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """One token per row: argmax of probs / Exp(1) noise (the Gumbel-max trick). A seeded
    row's noise is keyed by (seed, prompt, position); the others' come from the global RNG."""
    seeded = [row for row, r in enumerate(requests) if r.params.seed is not None]
    if len(seeded) == len(requests):
        noise = _seeded_noise(probs, requests)
    else:
        noise = torch.empty_like(probs).exponential_()
        if seeded:
            rows = to_device(seeded, torch.long, probs.device)
            noise.index_copy_(0, rows, _seeded_noise(probs, [requests[i] for i in seeded]))
    return (probs / noise).argmax(dim=1)


def _seeded_noise(probs: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """The rows' noise at their positions: the tokens each request has before this one
    (pending ones included, so the async loop needs no read-back)."""
    keys = []
    for r in requests:
        if r.prompt_digest is None:
            r.prompt_digest = prompt_digest(r.prompt_token_ids)
        keys.append(row_key(r.params.seed, r.prompt_digest, r.num_tokens))
    return exponential_noise(keys, probs.shape[1], probs.dtype, probs.device)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax; on the GPU one Triton launch (about 27 us less than torch's at a
    128k vocabulary, see kernels/triton_argmax.py)."""
    if logits.is_cuda and logits.dim() == 2:
        from pdserve.kernels.triton_argmax import argmax_rows

        return argmax_rows(logits)
    return logits.argmax(dim=1)


def _plain_greedy(r: Request) -> bool:
    p = r.params
    return (p.temperature == 0.0 and p.logprobs is None and p.repetition_penalty == 1.0
            and not p.frequency_penalty and not p.presence_penalty and not p.logit_bias
            and len(r.output_token_ids) >= p.min_tokens and r.grammar is None)


def sample_tokens(
    logits: torch.Tensor, requests: Sequence[Request], eos_token_ids: Sequence[int]
) -> torch.Tensor:
    """The next token of each row of `logits` [N, vocab], left on the device. Without
    penalties or min_tokens masking (which index by the output history), nothing here waits
    for the GPU, so async scheduling can queue the next step behind it; logit_bias needs no
    history."""
    if all(_plain_greedy(r) for r in requests):  # the common serving case: one argmax
        return argmax(logits)
    logits = logits.clone()
    _penalize(logits, requests)
    _add_logit_bias(logits, requests)
    _mask_stops_before_min_tokens(logits, requests, eos_token_ids)
    apply_grammar_masks(logits, requests)  # structured output: only what the grammar allows
    tokens = logits.argmax(dim=1)
    greedy = [r.params.greedy for r in requests]
    if not all(greedy):
        drawn = _draw(_filter(logits, requests), requests)
        tokens = torch.where(to_device(greedy, torch.bool, logits.device), tokens, drawn)
    return tokens


def sample(
    logits: torch.Tensor, requests: Sequence[Request], eos_token_ids: Sequence[int]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Sample the next token of each request from its row of float32 `logits` [N, vocab]."""
    raw_logprobs = None
    if any(r.params.logprobs is not None for r in requests):
        raw_logprobs = logits.log_softmax(dim=1)
    token_list = sample_tokens(logits, requests, eos_token_ids).tolist()  # one sync
    logprobs: list[TokenLogprob | None] = [None] * len(requests)
    if raw_logprobs is not None:
        for row, req in enumerate(requests):
            k = req.params.logprobs
            if k is None:
                continue
            top = raw_logprobs[row].topk(k) if k > 0 else None
            logprobs[row] = TokenLogprob(
                token_id=token_list[row],
                logprob=float(raw_logprobs[row, token_list[row]]),
                top=list(zip(top.indices.tolist(), top.values.tolist())) if top else [],
            )
    return token_list, logprobs
