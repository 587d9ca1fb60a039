"""The encoder role: a vision-language model's vision tower alone, serving image embeddings
to prefill instances (docs/DESIGN.md, "Encoder disaggregation")."""
