"""How long one engine step takes, predicted from its shape: a linear model in eight numbers.

The scheduler uses it to size prefill chunks under an inter-token-latency target; the planner
(pdserve/planner/) is meant to read the same model. It is plain data: `to_dict`/`from_dict`
round-trip through JSON, and `fit` builds one from timed steps (engine/calibrate.py).

Units: seconds for times; a step's shape counts tokens (see `StepShape`), so each
coefficient is seconds per token, per attention pair or per decode row, or seconds per step
for the four fixed costs (every step; a step of two or more rows, whose matmuls are
matrix-matrix rather than matrix-vector; a step of `wide_rows` or more rows, where the GEMM
library switches kernels again, found by the fit; a step that runs any prefill).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch


@dataclass
class StepShape:
    """What a step computes, in the units the model charges for."""

    prefill_tokens: int = 0  # prompt tokens run this step (all prefill chunks)
    prefill_attention: int = 0  # sum over those tokens of the tokens each attends to
    decode_rows: int = 0  # one-token rows
    decode_context: int = 0  # sum over decode rows of the tokens each attends to

    def add_prefill(self, num_tokens: int, num_computed: int) -> None:
        """A chunk of `num_tokens` after `num_computed` tokens already in the cache."""
        self.prefill_tokens += num_tokens
        # token i of the chunk (1-based) attends to num_computed + i tokens
        self.prefill_attention += prefill_pairs(num_tokens, num_computed)

    def add_decode(self, context: int) -> None:
        self.decode_rows += 1
        self.decode_context += context

    def features(self, wide_rows: int = 0) -> list[float]:
        """The model's inputs, in `StepTimeModel`'s coefficient order (`wide_rows` 0: no
        wide step)."""
        rows = self.prefill_tokens + self.decode_rows
        return [1.0, self.prefill_tokens, self.prefill_attention, self.decode_rows,
                self.decode_context, float(rows >= 2), float(self.prefill_tokens > 0),
                float(0 < wide_rows <= rows)]


def prefill_pairs(num_tokens: int, num_computed: int) -> int:
    """Attention (query, key) pairs of a causal chunk of `num_tokens` after `num_computed`."""
    return num_tokens * num_computed + num_tokens * (num_tokens + 1) // 2


@dataclass
class StepTimeModel:
    """seconds = base_s + per_prefill_token_s * prefill_tokens + per_prefill_pair_s *
    prefill_attention + per_decode_row_s * decode_rows + per_decode_context_s * decode_context
    + per_batched_step_s * (two or more rows) + per_prefill_step_s * (any prefill)
    + per_wide_step_s * (wide_rows or more rows).

    Every coefficient is >= 0 and base_s > 0, so a prediction is positive and never falls
    when a step grows."""

    base_s: float  # a step's fixed cost: launch, sampling, host work
    per_prefill_token_s: float  # weights' matmuls per prompt token
    per_prefill_pair_s: float  # prefill attention per (query, key) pair
    per_decode_row_s: float  # weights' matmuls per decode row
    per_decode_context_s: float  # decode attention per cached token read
    # one row takes matrix-vector kernels, two or more matrix-matrix ones (on a CPU a 1-row
    # decode step is ~30 ms shorter than the per-row slope says): their extra fixed cost
    per_batched_step_s: float = 0.0
    per_prefill_step_s: float = 0.0  # the prefill path's fixed cost (causal attention)
    # a second kernel switch, from wide_rows rows on (0: none): on a 2-core AVX2 EPYC, one
    # thread's 3-row decode step took 119 ms and its 4-row one 192-217 ms
    per_wide_step_s: float = 0.0
    wide_rows: int = 0

    def seconds(self, shape: StepShape) -> float:
        """Predicted wall time of a step of this shape."""
        return sum(c * x for c, x in zip(self._coefficients(), shape.features(self.wide_rows)))

    def max_prefill_tokens(self, shape: StepShape, num_computed: int, seconds: float,
                           limit: int) -> int:
        """The largest chunk (0..limit) after `num_computed` cached tokens that, added to
        `shape`, keeps the step within `seconds`."""
        lo, hi = 0, limit  # binary search: seconds() only grows with the chunk
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._with_prefill(shape, mid, num_computed) <= seconds:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _with_prefill(self, shape: StepShape, num_tokens: int, num_computed: int) -> float:
        grown = replace(shape)
        grown.add_prefill(num_tokens, num_computed)
        return self.seconds(grown)

    def scaled(self, prefill: float, decode: float) -> StepTimeModel:
        """This model with its prefill terms times `prefill` and its base and decode terms
        times `decode`: the same engine slowed by a neighbour (planner/corun.py)."""
        return replace(self, base_s=self.base_s * decode,
                       per_prefill_token_s=self.per_prefill_token_s * prefill,
                       per_prefill_pair_s=self.per_prefill_pair_s * prefill,
                       per_decode_row_s=self.per_decode_row_s * decode,
                       per_decode_context_s=self.per_decode_context_s * decode,
                       per_batched_step_s=self.per_batched_step_s * decode,
                       per_prefill_step_s=self.per_prefill_step_s * prefill,
                       per_wide_step_s=self.per_wide_step_s * decode)

    def _coefficients(self) -> list[float]:
        return [self.base_s, self.per_prefill_token_s, self.per_prefill_pair_s,
                self.per_decode_row_s, self.per_decode_context_s, self.per_batched_step_s,
                self.per_prefill_step_s, self.per_wide_step_s]

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> StepTimeModel:
        return cls(**{k: int(v) if k == "wide_rows" else float(v) for k, v in data.items()})

    @classmethod
    def fit(cls, shapes: list[StepShape], seconds: list[float]) -> StepTimeModel:
        """Least squares over timed steps in two stages: the decode-only steps give the base,
        decode, batched and wide terms; the steps with prefill give the prefill terms, fitted
        to what the decode terms leave of their time (fitted together, the many prefill-heavy
        steps drown a decode step's context term: measured on a CPU, the joint fit gave 0 s
        per context token where decode-only steps show 12 us). `wide_rows` is the row count
        (of WIDE_ROWS) whose extra fixed cost best fits the decode-only steps, kept only if
        it takes a tenth or more off their squared error, and that error is above rounding.
        Too few of either kind: one joint fit, with no wide step. Coefficients are held >= 0:
        a term whose free fit comes out negative (noise, or a cost another term already
        explains) is dropped and the rest refit. (A fit of the relative error was tried on an
        H100 and predicted served latencies worse: docs/PERF.md, "Planner on one GPU".)"""
        y = torch.tensor(seconds, dtype=torch.float64)
        decode = torch.tensor([s.prefill_tokens == 0 for s in shapes], dtype=torch.bool)
        if int(decode.sum()) < len(DECODE_TERMS) or int((~decode).sum()) < len(PREFILL_TERMS):
            x = torch.tensor([s.features() for s in shapes], dtype=torch.float64)
            values = _nonnegative_lstsq(x, y, keep=1)
            values[0] = max(values[0], 1e-6)  # a step is never free
            return cls(*values)
        fits = [_decode_fit(shapes, y, decode, wide) for wide in (0, *WIDE_ROWS)]
        plain = fits[0]
        wide, values, sse = min(fits[1:], key=lambda f: f[2])
        # an error at rounding's level is no error to take a tenth off: on exact timings,
        # which of two ~1e-35 errors is smaller is chance (a full suite found a wide step at
        # 12 rows where the test alone found none)
        rounding = 1e-12 * float((y[decode] ** 2).sum())
        if not (plain[2] > rounding and sse < 0.9 * plain[2] and values[7] > 0):
            wide, values, sse = plain
        x = torch.tensor([s.features(wide) for s in shapes], dtype=torch.float64)
        rest = y[~decode] - x[~decode][:, DECODE_TERMS] @ torch.tensor(
            [values[i] for i in DECODE_TERMS], dtype=torch.float64)
        for i, c in zip(PREFILL_TERMS, _nonnegative_lstsq(x[~decode][:, PREFILL_TERMS], rest,
                                                          keep=0)):
            values[i] = c
        values[0] = max(values[0], 1e-6)
        return cls(*values, wide_rows=wide if values[7] > 0 else 0)


def _decode_fit(shapes: list[StepShape], y: torch.Tensor, decode: torch.Tensor, wide: int
                ) -> tuple[int, list[float], float]:
    """(wide, coefficients, squared error) of the decode terms on the decode-only steps."""
    x = torch.tensor([s.features(wide) for s in shapes], dtype=torch.float64)[decode]
    values = [0.0] * x.shape[1]
    for i, c in zip(DECODE_TERMS, _nonnegative_lstsq(x[:, DECODE_TERMS], y[decode], keep=1)):
        values[i] = c
    residual = y[decode] - x[:, DECODE_TERMS] @ torch.tensor([values[i] for i in DECODE_TERMS],
                                                               dtype=torch.float64)
    return wide, values, float((residual ** 2).sum())


DECODE_TERMS = (0, 3, 4, 5, 7)  # base, per row, per context token, batched, wide: indices
WIDE_ROWS = (3, 4, 5, 6, 8, 12, 16)  # where a second kernel switch may sit
PREFILL_TERMS = (1, 2, 6)  # per prompt token, per attention pair, prefill step


def _nonnegative_lstsq(x: torch.Tensor, y: torch.Tensor, keep: int) -> list[float]:
    """Least squares of y on x's columns with every coefficient but the first `keep` held
    >= 0 (the most negative is dropped, the rest refit, until none is)."""
    scale = x.abs().amax(dim=0).clamp(min=1.0)  # columns span 1 to ~1e7: normalise
    # a column that never varies from 0, or repeats an earlier one (every step batched: the
    # batched column is the constant's), has no coefficient of its own: the system would be
    # singular, and its solution then turns on rounding (different on every BLAS thread
    # count)
    active = [j for j in range(x.shape[1]) if bool(x[:, j].any()) and not any(
        torch.equal(x[:, j], x[:, i]) for i in range(j))]
    scaled: list[float] = []
    while active:
        solution = torch.linalg.lstsq(x[:, active] / scale[active], y.unsqueeze(1)).solution
        scaled = solution.squeeze(1).tolist()
        worst = min(range(keep, len(active)), key=lambda i: scaled[i], default=None)
        if worst is None or scaled[worst] >= 0:
            break
        del active[worst]
    values = [0.0] * x.shape[1]
    for a, c in zip(active, scaled):
        values[a] = c / scale[a].item()
    return values
