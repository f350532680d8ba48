"""From a pruning run (or a one-shot ranking) to a plain dense Hugging Face model."""
