"""List the Prometheus series vLLM serves, read from its `vllm/v1/metrics/loggers.py` with `ast`.

    python scripts/vllm_metric_names.py PATH/TO/loggers.py --source "vllm-project/vllm@<commit> \
        vllm/v1/metrics/loggers.py" [--out tests/data/vllm_metrics.json]

Every call of a Prometheus metric class (`self._gauge_cls(...)`, `Counter(...)`,
`prometheus_client.Histogram(...)`, ...) with a `name=` gives one entry: its name, type and
label names, and the `if` tests it sits under (a metric only some configurations serve).
A counter's name is the one in the source: the exposition adds `_total` (`counter_exposed`).

Cases `ast` alone cannot resolve are handled explicitly, and fail loudly if new ones appear:
- `name=name` / `labelnames=labelnames`: a local variable, resolved from the plain string or
  list-of-strings assignments in the same function (`log_metrics_info`'s
  `name = "vllm:cache_config_info"`, `labelnames = ["model_name", "engine"]`);
- `labelnames + ["finished_reason"]`: list concatenation, resolved piecewise;
- `self.labelname_x`: an attribute assigned a string in the same function (LoRA's labels);
- `labelnames=metrics_info.keys()`: the info gauge's labels are a config object's
  `metrics_info()` keys, which live outside loggers.py: recorded as `["engine"]` plus
  `labels_from` naming the method.
Metrics built in other files (speculative decoding's SpecDecodingProm, the KV connector's
KVConnectorPrometheus) are not in loggers.py and so not listed.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

TYPES = {"_gauge_cls": "gauge", "_counter_cls": "counter", "_histogram_cls": "histogram",
         "Gauge": "gauge", "Counter": "counter", "Histogram": "histogram"}
INFO_LABELS_FROM = "CacheConfig.metrics_info() keys (outside loggers.py)"


def _metric_type(call: ast.Call) -> str | None:
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    return TYPES.get(name)


def _assignments(func: ast.AST) -> dict[str, ast.expr]:
    """`x = ...` and `self.x = ...` of one function, by target text (later ones win)."""
    found: dict[str, ast.expr] = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, (ast.Name, ast.Attribute)):
                found[ast.unparse(target)] = node.value
    return found


def _strings(node: ast.expr, env: dict[str, ast.expr]) -> list[str]:
    """A label list, with the explicit cases of the module docstring."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [s for item in node.elts for s in _strings(item, env)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _strings(node.left, env) + _strings(node.right, env)
    if isinstance(node, (ast.Name, ast.Attribute)) and ast.unparse(node) in env:
        return _strings(env[ast.unparse(node)], env)
    raise ValueError(f"cannot resolve {ast.unparse(node)!r} (line {node.lineno})")


def _metric(call: ast.Call, env: dict[str, ast.expr], conditions: list[str]) -> tuple[str, dict]:
    kwargs = {k.arg: k.value for k in call.keywords}
    (name,) = _strings(kwargs["name"], env)
    entry: dict = {"type": _metric_type(call)}
    labels = kwargs.get("labelnames")
    if labels is not None and ast.unparse(labels) == "metrics_info.keys()":
        entry["labels"], entry["labels_from"] = ["engine"], INFO_LABELS_FROM
    else:
        entry["labels"] = _strings(labels, env) if labels is not None else []
    if entry["type"] == "counter":
        entry["counter_exposed"] = name + "_total"
    if conditions:
        entry["only_if"] = conditions
    return name, entry


def _walk(node: ast.AST, env: dict[str, ast.expr], conditions: list[str], out: dict) -> None:
    if isinstance(node, ast.FunctionDef):
        env = {**env, **_assignments(node)}
    if isinstance(node, ast.Call) and _metric_type(node) and any(
            k.arg == "name" for k in node.keywords):
        name, entry = _metric(node, env, conditions)
        out[name] = entry
    if isinstance(node, ast.If):
        test = ast.unparse(node.test)
        for child in node.body:
            _walk(child, env, [*conditions, test], out)
        for child in node.orelse:
            _walk(child, env, [*conditions, f"not ({test})"], out)
        return
    for child in ast.iter_child_nodes(node):
        _walk(child, env, conditions, out)


def extract(source: str) -> dict[str, dict]:
    """{metric name: {"type", "labels", ...}} of every metric loggers.py defines."""
    out: dict[str, dict] = {}
    _walk(ast.parse(source), {}, [], out)
    return dict(sorted(out.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("loggers_py", type=Path)
    ap.add_argument("--source", required=True, help="where loggers.py came from (repo@commit)")
    ap.add_argument("--out", type=Path, default=Path("tests/data/vllm_metrics.json"))
    args = ap.parse_args()
    metrics = extract(args.loggers_py.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": args.source, "metrics": metrics}, indent=1) + "\n")
    print(f"{len(metrics)} metrics -> {args.out}")


if __name__ == "__main__":
    main()
