"""private-llm: an OpenAI-compatible inference server."""

import os

# Idle OpenMP threads sleep rather than spin (libgomp reads this once, when torch loads). Measured on 2
# cores: one process alone decodes at the same rate either way (~250 steps in 20 s), while three processes
# sharing the cores made 55 steps each spinning and ~150 each sleeping. A server shares its cores with
# nginx, its tokenizer threads and, on small hosts, other services. vLLM's cold start on the same cores:
# 102 and 80 s spinning, 135 and 82 s sleeping (within its run-to-run spread). An operator's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
