"""drpruning: structured L0 pruning of Llama / Qwen2 decoders with distributionally robust data scheduling
(DRPruning), as a plugin for Composer and LLM-Foundry.

The subpackages are the design: `pruning` (what is removed and how the gates learn it), `scheduling`
(which data the next steps see), `data` (the domains they meet), `export` (from masks to a plain Hugging
Face model) and `demo` (the embedded demo and test support). LLM-Foundry finds the components through the
entry points in `pyproject.toml`; nothing is imported here, so `import drpruning` is cheap.
"""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("drpruning")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
