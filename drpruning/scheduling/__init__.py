"""Distributionally robust data scheduling: DRO in a chi-square ball, the scaling-law reference loss,
the policies (constant, sheared, dro, drpruning) and the `data_scheduler` callback that applies them."""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "dro_proportions": "dro",
    "worst_case_proportions": "dro",
    "ScalingLawFit": "scaling_law",
    "fit_scaling_law": "scaling_law",
    "predict_final_loss": "scaling_law",
    "POLICY_NAMES": "policies",
    "Policy": "policies",
    "Observation": "policies",
    "Decision": "policies",
    "make_policy": "policies",
    "DataScheduler": "scheduler",
    "MixtureDataset": "contracts",
    "DomainStatsModel": "contracts",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    # Lazy, so that importing one light module (e.g. `drpruning.scheduling.dro`) does not pull in Composer.
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
