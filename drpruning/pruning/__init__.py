"""Structured pruning: target shapes, hard-concrete L0 masks, the masked HF model, its Composer model
and the `pruning` callback, and gate initialisation from measured importance."""
