"""The HTTP half of benchmarks/interop_vllm_cpu.sh: send one prompt set, compare, tabulate.

    reference URL --out REF.json                       answers of a colocated instance
    compare SETUP URL --reference REF.json --rows ROWS.jsonl [--kv-metric URL NAME ...]
    table --rows ROWS.jsonl [--bench-log LOG] --out RESULTS.json   markdown on stdout

Every request is greedy (temperature 0), so a disaggregated answer is right only if its
text and usage.completion_tokens equal the colocated reference of the same engine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

MODEL = "smollm2"  # every server of the harness runs with --served-model-name smollm2
TIMEOUT = httpx.Timeout(180.0, connect=10.0)
_LONG_TEXT = (
    "Prefill/decode disaggregation runs the compute-bound prefill of a prompt on one engine "
    "and the bandwidth-bound decode on another; the prompt's KV cache moves between them. "
) * 6


@dataclass
class Prompt:
    """One request of the set: a completion (`prompt`) or a chat (`messages`)."""

    name: str
    max_tokens: int
    stream: bool
    prompt: str | None = None
    messages: list[dict] | None = None

    def body(self) -> dict:
        body: dict = {"model": MODEL, "max_tokens": self.max_tokens, "temperature": 0,
                      "stream": self.stream}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.prompt is not None:
            return body | {"prompt": self.prompt}
        return body | {"messages": self.messages}

    def path(self) -> str:
        return "/v1/completions" if self.prompt is not None else "/v1/chat/completions"


PROMPTS = [
    Prompt("cmpl-short", 16, False, prompt="The capital of France is"),
    Prompt("cmpl-code-stream", 32, True, prompt="def fibonacci(n):"),
    Prompt("cmpl-medium-stream", 24, True,
           prompt="A paged KV cache stores keys and values in fixed-size blocks, so that"),
    Prompt("cmpl-long", 32, False, prompt=_LONG_TEXT + "In one sentence, the main benefit is"),
    Prompt("chat-short", 16, False,
           messages=[{"role": "user", "content": "What is the capital of France?"}]),
    Prompt("chat-haiku-stream", 20, True,
           messages=[{"role": "user", "content": "Write a haiku about the sea."}]),
    Prompt("chat-multiturn", 28, False, messages=[
        {"role": "user", "content": "Name a river in Europe."},
        {"role": "assistant", "content": "The Danube."},
        {"role": "user", "content": "Which countries does it flow through?"},
    ]),
    Prompt("chat-long-stream", 32, True,
           messages=[{"role": "user", "content": _LONG_TEXT + "Summarize this in one line."}]),
]


@dataclass
class Answer:
    """What a server said to one prompt (error: anything that kept it from answering)."""

    name: str
    text: str = ""
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None


def _piece(choice: dict) -> str:
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("delta") or choice.get("message") or {}).get("content") or ""


def _read_stream(resp: httpx.Response, answer: Answer) -> None:
    for line in resp.iter_lines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        chunk = json.loads(line[5:])
        if "error" in chunk:
            answer.error = json.dumps(chunk["error"])[:300]
        for choice in chunk.get("choices") or []:
            answer.text += _piece(choice)
            answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
        if chunk.get("usage"):
            answer.completion_tokens = chunk["usage"].get("completion_tokens")


def ask(client: httpx.Client, base_url: str, prompt: Prompt) -> Answer:
    """Send `prompt` to `base_url` and collect its text and usage, streamed or not."""
    answer = Answer(prompt.name)
    try:
        with client.stream("POST", base_url + prompt.path(), json=prompt.body()) as resp:
            if resp.status_code != 200:
                answer.error = f"HTTP {resp.status_code}: {resp.read().decode()[:300]}"
            elif prompt.stream:
                _read_stream(resp, answer)
            else:
                body = json.loads(resp.read())
                choice = body["choices"][0]
                answer.text, answer.finish_reason = _piece(choice), choice.get("finish_reason")
                answer.completion_tokens = (body.get("usage") or {}).get("completion_tokens")
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError) as exc:
        answer.error = f"{type(exc).__name__}: {exc}"[:300]
    return answer


def ask_all(base_url: str) -> list[Answer]:
    answers = []
    for prompt in PROMPTS:  # a connection each: a server's 500 may close a kept-alive one
        with httpx.Client(timeout=TIMEOUT) as client:
            answers.append(ask(client, base_url.rstrip("/"), prompt))
    return answers


def metric_total(url: str, name: str) -> float | None:
    """Sum of the samples of metric `name` at `url`/metrics; `name{label="v"}` keeps only
    samples with that label. None if unreadable."""
    base, _, wanted = name.partition("{")
    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=10.0).text
    except httpx.HTTPError:
        return None
    pattern = re.compile(rf"^{re.escape(base)}(?:_total)?(?:\{{([^}}]*)\}})?\s+(\S+)", re.MULTILINE)
    return sum(float(v) for labels, v in pattern.findall(text) if wanted.rstrip("}") in labels)


@dataclass
class Row:
    """One setup's verdict against its reference."""

    setup: str
    reference: str
    requests: int
    exact_text: int = 0
    usage_right: int = 0
    errors: int = 0
    kv: str = "n/a"
    first_mismatch: dict | None = None
    answers: list[dict] = field(default_factory=list)


def _mismatch(expected: dict, got: Answer) -> dict:
    return {"prompt": got.name, "expected": expected["text"], "got": got.text,
            "expected_tokens": expected["completion_tokens"],
            "got_tokens": got.completion_tokens, "error": got.error}


def compare(setup: str, answers: list[Answer], reference: dict) -> Row:
    """Count exact texts and right usages of `answers` against the reference answers."""
    expected = {a["name"]: a for a in reference["answers"]}
    row = Row(setup, reference["source"], len(answers), answers=[asdict(a) for a in answers])
    for got in answers:
        want = expected[got.name]
        row.errors += got.error is not None
        text_ok = got.error is None and got.text == want["text"]
        usage_ok = got.error is None and got.completion_tokens == want["completion_tokens"]
        row.exact_text += text_ok
        row.usage_right += usage_ok
        if not (text_ok and usage_ok) and row.first_mismatch is None:
            row.first_mismatch = _mismatch(want, got)
    return row


def _kv_verdict(deltas: list[tuple[str, float | None]], requests: int) -> str:
    if not deltas:
        return "n/a"
    parts = [f"{name} +{d:g}" if d is not None else f"{name} unreadable" for name, d in deltas]
    moved = any(d for _, d in deltas)
    return ("yes" if moved else "no") + f" ({', '.join(parts)}; {requests} requests)"


def run_compare(args: argparse.Namespace) -> None:
    reference = json.loads(Path(args.reference).read_text())
    probes = [(url, name) for url, name in (args.kv_metric or [])]
    before = [metric_total(url, name) for url, name in probes]
    answers = ask_all(args.url)
    after = [metric_total(url, name) for url, name in probes]
    deltas = [(name, None if b is None or a is None else a - b)
              for (_, name), b, a in zip(probes, before, after)]
    row = compare(args.setup, answers, reference)
    row.kv = args.kv_note or _kv_verdict(deltas, len(answers))
    with open(args.rows, "a") as f:
        f.write(json.dumps(asdict(row)) + "\n")
    print(f"{row.setup}: exact {row.exact_text}/{row.requests}, usage "
          f"{row.usage_right}/{row.requests}, errors {row.errors}, kv {row.kv}", file=sys.stderr)


def run_reference(args: argparse.Namespace) -> None:
    answers = ask_all(args.url)
    failed = [a for a in answers if a.error]
    Path(args.out).write_text(json.dumps(
        {"source": args.source, "answers": [asdict(a) for a in answers]}, indent=1))
    print(f"reference {args.source}: {len(answers) - len(failed)}/{len(answers)} answered",
          file=sys.stderr)
    if failed:
        sys.exit(f"reference failed: {failed[0].error}")


def bench_summary(log: str) -> dict:
    """`vllm bench serve`'s result block (metric: value) and its warning lines."""
    lines = log.splitlines()
    summary, inside = {}, False
    for line in lines:
        if "Serving Benchmark Result" in line:
            inside = True
        elif inside and ":" in line:
            key, _, value = line.rpartition(":")
            summary[key.strip()] = value.strip()
        elif inside and line.startswith("====") and summary:
            inside = False
    warnings = [ln.strip() for ln in lines if re.search(r"warn|error", ln, re.IGNORECASE)]
    return {"summary": summary, "warnings": warnings[:20]}


def _cell(text: str, limit: int = 60) -> str:
    text = text.replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _example(row: dict) -> str:
    m = row["first_mismatch"]
    if m is None:
        return "all match"
    if m["error"]:
        return f"{m['prompt']}: error {_cell(m['error'])}"
    return (f"{m['prompt']}: want {_cell(repr(m['expected']), 45)} ({m['expected_tokens']} tok), "
            f"got {_cell(repr(m['got']), 45)} ({m['got_tokens']} tok)")


def markdown(rows: list[dict]) -> str:
    out = ["| setup | KV handed over | exact text | usage right | example |",
           "|---|---|---|---|---|"]
    for r in rows:
        n = r["requests"]
        out.append(f"| {r['setup']} | {_cell(r['kv'], 80)} | {r['exact_text']}/{n} | "
                   f"{r['usage_right']}/{n} | {_example(r)} |")
    return "\n".join(out)


def run_table(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line]
    result: dict = {"prompts": [asdict(p) for p in PROMPTS], "setups": rows}
    if args.bench_log and Path(args.bench_log).is_file():
        result["vllm_bench_serve"] = bench_summary(Path(args.bench_log).read_text())
    if args.notes and Path(args.notes).is_file():
        result["notes"] = Path(args.notes).read_text().splitlines()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(rows))
    bench = result.get("vllm_bench_serve", {}).get("summary")
    if bench:
        print("\n`vllm bench serve` against pdserve's router (pdserve P+D):\n")
        print("\n".join(f"- {k}: {v}" for k, v in bench.items()))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the three subcommands (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference")
    ref.add_argument("url")
    ref.add_argument("--source", required=True)
    ref.add_argument("--out", required=True)
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("setup")
    cmp_.add_argument("url")
    cmp_.add_argument("--reference", required=True)
    cmp_.add_argument("--rows", required=True)
    cmp_.add_argument("--kv-metric", nargs=2, action="append", metavar=("URL", "NAME"))
    cmp_.add_argument("--kv-note", help="what to say in the KV column instead of metrics")
    table = sub.add_parser("table")
    table.add_argument("--rows", required=True)
    table.add_argument("--bench-log")
    table.add_argument("--notes")
    table.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    {"reference": run_reference, "compare": run_compare, "table": run_table}[args.command](args)


if __name__ == "__main__":
    main()
