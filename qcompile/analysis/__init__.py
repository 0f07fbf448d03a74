"""Analysis of a compiled model: evaluation, per-layer debugging, sensitivity, op fidelity, and the accuracy search built on them."""
