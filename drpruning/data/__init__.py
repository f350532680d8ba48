"""Domain data: preparation into MDS splits, the dynamic domain mixer, per-domain evaluation, remote
data through mosaicml-streaming, and the checks where prepared data meets a model."""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "prepare_data": "prepare",
    "load_manifest": "manifest",
    "MixturePlan": "mixture_plan",
    "DomainMixtureDataset": "mixer",
    "build_domain_mixture_dataloader": "mixer",
    "domain_eval_loaders": "domain_eval",
    "expand_domain_eval": "domain_eval",
    "fetch_manifest": "remote",
    "upload_prepared": "remote",
    "check_tokenizer": "checks",
    "check_seq_len": "checks",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    # Lazy, so that importing one light module (e.g. `drpruning.data.prepare`) does not pull in Composer.
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
