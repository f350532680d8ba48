"""Domain data: preparation into MDS splits, the dynamic domain mixer, per-domain evaluation, remote
data through mosaicml-streaming, and the checks where prepared data meets a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drpruning._lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time each loads on first use
    from drpruning.data.checks import (
        check_seq_len as check_seq_len,
        check_tokenizer as check_tokenizer,
    )
    from drpruning.data.domain_eval import (
        domain_eval_loaders as domain_eval_loaders,
        expand_domain_eval as expand_domain_eval,
    )
    from drpruning.data.manifest import load_manifest as load_manifest
    from drpruning.data.mixer import (
        DomainMixtureDataset as DomainMixtureDataset,
        build_domain_mixture_dataloader as build_domain_mixture_dataloader,
    )
    from drpruning.data.mixture_plan import MixturePlan as MixturePlan
    from drpruning.data.prepare import prepare_data as prepare_data
    from drpruning.data.remote import (
        fetch_manifest as fetch_manifest,
        upload_prepared as upload_prepared,
    )

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
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
})
