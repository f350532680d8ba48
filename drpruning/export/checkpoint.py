"""Read a pruning run's Composer checkpoint and rebuild what it was trained from: the source HF model, its L0
module, the source model's name and the step.

A run folder stands for its latest checkpoint; a checkpoint is a monolithic `ep*-ba*-rank0.pt` file or a
sharded (FSDP, torch.distributed.checkpoint) `ep*-ba*` folder. Only the parts export needs are read: the
model, the callbacks' state (the pruning description), the timestamp and the Hugging Face integration
(config and tokenizer), never the optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate import init_empty_weights
from composer.models.huggingface import get_hf_config_from_composer_state_dict
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from drpruning.errors import ExportError, ShapeError, UnsafeFileError
from drpruning.pruning.masks import L0Module
from drpruning.pruning.shapes import TARGET_KEYS, ModelShape
from drpruning.runs import MASKS_DIR, MASKS_META_FILE, PRUNING_STATE_KEY
from drpruning.safe_load import load_sharded_keys, load_torch_file

MODEL_PREFIX = "model."  # ComposerHFCausalLM keeps the HF model as `.model`
L0_PREFIX = "l0_module."
GATES_PREFIX = L0_PREFIX + "gates."
STATE_KEYS = ("model", "callbacks", "timestamp", "integrations")  # the parts of Composer's `state` export reads
_CHECKPOINT_NAME = re.compile(r"^ep(\d+)-ba(\d+)(-rank0\.pt)?$")
_DCP_METADATA = ".metadata"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or sharded checkpoint dir; a run folder gives its latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    if path.is_file() or (path / _DCP_METADATA).is_file():
        return path
    latest = path / "latest-rank0.pt"
    if latest.exists():
        return latest.resolve()
    candidates = [(int(m[1]), int(m[2]), child) for child in path.iterdir()
                  if (m := _CHECKPOINT_NAME.match(child.name)) and (m[3] or (child / _DCP_METADATA).is_file())]  # fmt: skip
    if not candidates:
        raise ExportError(f"{path} holds no Composer checkpoint (no latest-rank0.pt, ep*-ba*-rank0.pt or "
                          "sharded ep*-ba* folder)")  # fmt: skip
    return max(candidates)[2]


def _load_composer_state(checkpoint: Path) -> dict[str, Any]:
    """`state` of a Composer checkpoint (model, callbacks, timestamp, integrations), tensors memory-mapped."""
    if checkpoint.is_dir():
        # Composer's load_sharded_checkpoint needs a Trainer State, and torch's public dcp.load a template of
        # every tensor; load_sharded_keys builds chosen keys from the checkpoint's own metadata, and unlike
        # torch's _load_state_dict_from_keys unpickles nothing unchecked.
        try:
            loaded = load_sharded_keys(checkpoint, {f"state.{key}" for key in STATE_KEYS})
        except UnsafeFileError as error:
            raise ExportError(str(error)) from None
        except Exception as error:  # noqa: BLE001 - any reader failure means an unreadable checkpoint
            raise ExportError(f"cannot read sharded checkpoint {checkpoint}: {error}") from error
    else:
        # Not composer.utils.checkpoint.safe_torch_load: it reads without mmap, so the optimizer state would be
        # read into memory too (twice the model's size for Adam) only to be dropped.
        # Never weights_only=False: a checkpoint may come from anyone (drpruning/safe_load.py).
        try:
            loaded = load_torch_file(checkpoint, "a Composer checkpoint", mmap=True)
        except UnsafeFileError as error:
            raise ExportError(str(error)) from None
        except ValueError as error:
            raise ExportError(str(error)) from None
    state = loaded.get("state") if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
        raise ExportError(f"{checkpoint} is not a Composer checkpoint (no state['model'])")
    return state


def _pruning_description(state: Mapping[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The `PruningCallback` state in the checkpoint, else `masks/meta.json` of the run folder."""
    saved = (state.get("callbacks") or {}).get(PRUNING_STATE_KEY)
    if isinstance(saved, Mapping) and "l0" in saved:
        return dict(saved)
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        meta = folder / MASKS_DIR / MASKS_META_FILE
        if meta.is_file():
            return json.loads(meta.read_text(encoding="utf-8"))
    raise ExportError(f"{checkpoint} has no {PRUNING_STATE_KEY} state and no masks/meta.json next to it: "
                      "cannot tell the pruning target (was the `pruning` callback in the run?)")  # fmt: skip


def _source_config(description: Mapping[str, Any], state: dict[str, Any]) -> PretrainedConfig:
    """The source model's HF config: the pruning description's copy, else the one Composer saved."""
    if "hf_config" in description:
        return AutoConfig.for_model(**description["hf_config"])
    try:
        return get_hf_config_from_composer_state_dict({"state": state})
    except (KeyError, TypeError):
        raise ExportError("neither the pruning description nor the checkpoint holds the source HF config") from None


@dataclasses.dataclass
class PruningCheckpoint:
    """A pruning run's checkpoint, rebuilt: the source HF model, its L0 module, and where it came from.

    `embedded_tokenizer` is the tokenizer Composer saved in the checkpoint (its `integrations.huggingface.tokenizer`)."""

    path: Path
    model: PreTrainedModel
    l0_module: L0Module
    source: str | None
    step: int | None
    embedded_tokenizer: dict[str, Any] | None


def load_pruning_checkpoint(checkpoint_or_run_dir: str | Path) -> PruningCheckpoint:
    """Rebuild the source model and its L0 module from a checkpoint (or a run folder's latest), every part
    checked against the pruning description so a mismatch is an `ExportError`, not a wrong export."""
    checkpoint = resolve_checkpoint(checkpoint_or_run_dir)
    state = _load_composer_state(checkpoint)
    model_state: Mapping[str, Tensor] = state["model"]
    if not any(key.startswith(GATES_PREFIX) for key in model_state):
        raise ExportError(
            f"{checkpoint} has no {GATES_PREFIX}* keys: it comes from a run without pruning masks. "
            "Continued-pretraining checkpoints are already dense and need no export (use hf_checkpointer)."
        )
    description = _pruning_description(state, checkpoint)
    l0_description = description["l0"]
    config = _source_config(description, state)
    shape = ModelShape.from_hf_config(config)
    recorded = {"head_norms": 0, **l0_description["source_shape"]}  # written before Qwen3: no head norms
    if dataclasses.asdict(shape) != recorded:
        raise ExportError(f"the HF config's shape {dataclasses.asdict(shape)} differs from the pruning "
                          f"description's source shape {l0_description['source_shape']}")  # fmt: skip

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    hf_state = {k[len(MODEL_PREFIX):]: v for k, v in model_state.items() if k.startswith(MODEL_PREFIX)}
    try:
        model.load_state_dict(hf_state, strict=True, assign=True)
    except RuntimeError as error:
        raise ExportError(f"the weights in {checkpoint} do not fit the source config: {error}") from error
    if config.tie_word_embeddings:
        model.tie_weights()

    target = {key: l0_description["target_shape"][key] for key in TARGET_KEYS}
    try:
        l0_module = L0Module(shape, target=target, pruning_modules=l0_description["pruning_modules"])
    except ShapeError as error:
        raise ExportError(f"the pruning description in or next to {checkpoint} is not usable: {error}") from error
    l0_state = {k[len(L0_PREFIX):]: v for k, v in model_state.items() if k.startswith(L0_PREFIX)}
    try:
        l0_module.load_state_dict(l0_state, strict=True)
    except RuntimeError as error:
        raise ExportError(f"the l0_module in {checkpoint} does not fit its pruning description: {error}") from error

    timestamp = (state.get("timestamp") or {}).get("Timestamp") or {}
    tokenizer_state = ((state.get("integrations") or {}).get("huggingface") or {}).get("tokenizer")
    return PruningCheckpoint(
        path=checkpoint,
        model=model.eval(),
        l0_module=l0_module,
        source=description.get("source"),
        step=timestamp.get("batch"),
        embedded_tokenizer=tokenizer_state,
    )
