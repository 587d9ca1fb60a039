"""pdserve bench: a load generator and report for any OpenAI-compatible endpoint.

It talks HTTP only (see docs/BENCH.md): workloads build prompts, arrivals schedule them,
the client sends them and timestamps every streamed chunk, metrics turn the records into
vLLM-named figures, and sweep/compare/plots put deployments side by side.
"""
