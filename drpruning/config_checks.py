"""LLM-Foundry config transform: a misspelt key in a drpruning `model` or `train_loader` block is one clear
error naming the key (and the nearest known one), not a `TypeError` traceback from deep in the builder.

Registered as `drpruning_check_keys`; foundry runs it on every train config, and blocks that name other
builders pass through unchanged. (`eval_loader: {name: domain_eval}` blocks are checked where they are
expanded, `drpruning/data/domain_eval.py`.)
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable, Iterable
from typing import Any

from drpruning.errors import ConfigError

# Keys foundry itself consumes or passes to every builder, never to be reported as unknown.
_FOUNDRY_KEYS = {"name"}
_PASSED_BY_FOUNDRY = {"self", "tokenizer", "device_batch_size", "kwargs", "args"}


def _parameters(*functions: Callable[..., Any]) -> set[str]:
    names: set[str] = set()
    for function in functions:
        names |= {p.name for p in inspect.signature(function).parameters.values()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}  # fmt: skip
    return names - _PASSED_BY_FOUNDRY


def check_keys(block: dict[str, Any], allowed: Iterable[str], where: str) -> None:
    """`ConfigError` naming each key of `block` that is not in `allowed`, with the closest known key."""
    allowed = set(allowed) | _FOUNDRY_KEYS
    unknown = sorted(set(block) - allowed)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}; known: {', '.join(sorted(allowed))}")


def _model_keys() -> set[str]:
    from llmfoundry.models.hf.hf_causal_lm import ComposerHFCausalLM

    from drpruning.pruning.model import DRPruningCausalLM

    return _parameters(DRPruningCausalLM.__init__, ComposerHFCausalLM.__init__)


def _mixture_keys() -> set[str]:
    from drpruning.data.mixer import build_domain_mixture_dataloader

    return _parameters(build_domain_mixture_dataloader)


_BLOCKS: dict[tuple[str, str], Callable[[], set[str]]] = {
    ("model", "drpruning_causal_lm"): _model_keys,
    ("train_loader", "domain_mixture"): _mixture_keys,
}


def check_drpruning_blocks(cfg: dict[str, Any]) -> dict[str, Any]:
    """Refuse unknown keys in the drpruning builders' blocks, and `hf_checkpointer` in a pruning run;
    returns `cfg` unchanged."""
    for (section, name), keys in _BLOCKS.items():
        block = cfg.get(section)
        if isinstance(block, dict) and block.get("name") == name:
            check_keys(block, keys(), f"{section} ({name})")
    model, callbacks = cfg.get("model"), cfg.get("callbacks")
    pruning = isinstance(model, dict) and model.get("name") == "drpruning_causal_lm" and model.get("l0_module")
    if pruning:
        check_fsdp_for_pruning(cfg.get("fsdp_config") or cfg.get("parallelism_config", {}).get("fsdp"))
    if pruning and isinstance(callbacks, dict) and "hf_checkpointer" in callbacks:
        raise ConfigError("callbacks.hf_checkpointer in a pruning run would save the unpruned source model (it "
                          "knows nothing of the masks); remove it and export the pruned model with "
                          "`python scripts/prune_to_dense.py RUN_FOLDER OUT_DIR` (continued-pretraining runs may "
                          "keep it)")  # fmt: skip
    return cfg


def check_fsdp_for_pruning(fsdp: Any) -> None:
    """The FSDP settings a pruning run cannot train under, for Composer's FSDP1 (the default) and FSDP2
    (`FSDP_VERSION=2`). The masks reach the decoder through hooks, not through the checkpointed blocks'
    inputs, so reentrant activation checkpointing (FSDP1's default when `activation_checkpointing` is on)
    would recompute the blocks outside autograd's view of them, and the backward fails ("Trying to backward
    through the graph a second time"). FSDP2 always checkpoints without reentry. FSDP1 also needs
    `use_orig_params` for the gates' and multipliers' own param groups."""
    if not isinstance(fsdp, dict) or os.environ.get("FSDP_VERSION", "1") == "2":
        return
    if fsdp.get("use_orig_params") is False:
        raise ConfigError("fsdp_config.use_orig_params: false in a pruning run: Composer's FSDP1 can then keep only "
                          "one optimizer param group, and the gates and multipliers need their own; set it to true")
    if fsdp.get("activation_checkpointing") and fsdp.get("activation_checkpointing_reentrant", True):
        raise ConfigError("fsdp_config.activation_checkpointing in a pruning run needs "
                          "fsdp_config.activation_checkpointing_reentrant: false (Composer's FSDP1 default is "
                          "true): reentrant checkpointing recomputes each block outside autograd's view of the "
                          "masks, and the backward through the gates fails")  # fmt: skip
