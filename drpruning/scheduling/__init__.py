"""Distributionally robust data scheduling: DRO in a chi-square ball, the scaling-law reference loss,
the policies (constant, sheared, dro, drpruning) and the `data_scheduler` callback that applies them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpruning._lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time each loads on first use
    from drpruning.scheduling.contracts import (
        DomainStatsModel as DomainStatsModel,
        MixtureDataset as MixtureDataset,
    )
    from drpruning.scheduling.dro import (
        dro_proportions as dro_proportions,
        worst_case_proportions as worst_case_proportions,
    )
    from drpruning.scheduling.policies import (
        POLICY_NAMES as POLICY_NAMES,
        Decision as Decision,
        Observation as Observation,
        Policy as Policy,
        make_policy as make_policy,
    )
    from drpruning.scheduling.scaling_law import (
        ScalingLawFit as ScalingLawFit,
        fit_scaling_law as fit_scaling_law,
        predict_final_loss as predict_final_loss,
    )
    from drpruning.scheduling.scheduler import DataScheduler as DataScheduler

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
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
})
