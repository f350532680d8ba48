"""The Composer model: a stock HF Llama/Qwen2 causal LM, optionally with L0 pruning masks.

Registered in LLM-Foundry as `drpruning_causal_lm`. With an `l0_module` block it prunes toward a target
shape; without one it is a plain causal LM (continued pretraining) that still reports per-domain loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from composer.core import Time, TimeUnit
from llmfoundry.models.hf.hf_causal_lm import ComposerHFCausalLM
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from drpruning.errors import ConfigError, ShapeError
from drpruning.losses import next_token_losses
from drpruning.pruning.calibration import CalibrationConfig, check_calibration_tokenizer
from drpruning.pruning.distillation import (
    SOURCE_TEACHER,
    DistillationConfig,
    check_teacher_fits,
    teacher_logits,
    token_kl,
)
from drpruning.pruning.masks import L0Module
from drpruning.pruning.prunable import make_prunable
from drpruning.pruning.shapes import ModelShape


class DomainStats:
    """Summed token cross-entropy and target-token counts per domain, since the last `take`.

    Kept on the batch's device and grown on demand, so the model needs no domain list; the scheduler
    says how many domains it expects when it takes the totals (and learns of any id out of range).
    """

    def __init__(self) -> None:
        self.loss_sum: Tensor | None = None
        self.tokens: Tensor | None = None

    @torch.no_grad()
    def add(self, domain: Tensor, token_loss: Tensor, token_mask: Tensor) -> None:
        """Accumulate per-sequence sums of `token_loss` [B, S] (masked by `token_mask`) by `domain` [B]."""
        if (domain < 0).any():
            raise ValueError(f"negative domain id in batch: {domain.tolist()}")
        size = int(domain.max()) + 1
        seq_loss = (token_loss.double() * token_mask).sum(-1)
        seq_tokens = token_mask.double().sum(-1)
        if self.loss_sum is None or self.loss_sum.device != domain.device:
            self.loss_sum = torch.zeros(size, dtype=torch.float64, device=domain.device)
            self.tokens = torch.zeros(size, dtype=torch.float64, device=domain.device)
        elif self.loss_sum.numel() < size:
            grow = size - self.loss_sum.numel()
            self.loss_sum = F.pad(self.loss_sum, (0, grow))
            self.tokens = F.pad(self.tokens, (0, grow))
        self.loss_sum.index_add_(0, domain, seq_loss)
        self.tokens.index_add_(0, domain, seq_tokens)

    def take(self, num_domains: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Return (loss_sum, tokens) as float64 [num_domains] and reset; zeros if nothing was seen."""
        if self.loss_sum is None:
            zeros = torch.zeros(num_domains, dtype=torch.float64, device=device)
            return zeros, zeros.clone()
        if self.loss_sum.numel() > num_domains:
            seen = torch.nonzero(self.tokens[num_domains:]).flatten() + num_domains
            if seen.numel():
                raise ValueError(f"batches carried domain ids {seen.tolist()} but only {num_domains} domains exist")
        loss_sum = F.pad(self.loss_sum, (0, max(0, num_domains - self.loss_sum.numel())))[:num_domains]
        tokens = F.pad(self.tokens, (0, max(0, num_domains - self.tokens.numel())))[:num_domains]
        self.loss_sum, self.tokens = None, None
        return loss_sum, tokens


L0_MODULE_KEYS = ("target", "pruning_modules", "lagrangian_warmup", "init_log_alpha", "eval_masks", "init",
                  "init_band", "calibration", "init_lambda_1", "init_lambda_2", "freeze_masks_at")


def batches(value: Any, name: str) -> int:
    """A yaml duration (`640` or `'640ba'`) as a number of batches, read by Composer's `Time`."""
    try:
        duration = None if isinstance(value, bool) else Time.from_input(value, TimeUnit.BATCH)
    except (TypeError, ValueError):
        duration = None
    if duration is None or duration.unit != TimeUnit.BATCH or duration.value < 0:
        raise ShapeError(f"{name}={value!r} must be a non-negative number of batches, e.g. 640 or '640ba'")
    return int(duration.value)


def l0_module_options(block: Mapping[str, Any]) -> tuple[dict[str, Any], CalibrationConfig | None]:
    """The `l0_module` yaml block as `L0Module` keyword arguments plus its calibration config (or None).

    Checked before the (possibly large) source model is loaded."""
    unknown = sorted(set(block) - set(L0_MODULE_KEYS))
    if unknown:
        raise ConfigError(f"unknown l0_module keys {unknown}; known: {list(L0_MODULE_KEYS)}")
    if "target" not in block:
        raise ConfigError("l0_module needs a `target` shape, e.g. {n_layers: 24, hidden_size: 2048, ...}")
    calibration = None
    if block.get("init") == "importance":
        calibration = CalibrationConfig.from_dict(block.get("calibration"))
    elif block.get("calibration") is not None:
        raise ConfigError("l0_module.calibration is only read with l0_module.init: importance")
    options = {key: value for key, value in block.items() if key != "calibration"}
    for key in ("lagrangian_warmup", "freeze_masks_at"):
        if options.get(key) is not None:
            options[key] = batches(options[key], key)
    return options, calibration


class DRPruningCausalLM(ComposerHFCausalLM):
    """HF causal LM + optional `L0Module` (as the child `l0_module`, so FSDP wraps it as its own unit).

    yaml:
        model:
          name: drpruning_causal_lm
          pretrained_model_name_or_path: <local HF dir>
          l0_module:                       # omit for continued pretraining
            pruning_modules: [layer, head, intermediate, hidden]
            target: {n_layers: 24, hidden_size: 2048, n_heads: 16, n_kv_heads: 16, intermediate_size: 5504}
            lagrangian_warmup: 640ba
            eval_masks: current            # evals score the current expected size; `target`: the final shape
            init: uniform                  # the paper; `importance`: gates ordered by a calibration pass
            calibration: {data_dir: DIR}   # init: importance only (drpruning/pruning/calibration.py: CalibrationConfig)

    Args (the keys of the `model` block; foundry passes `tokenizer`, and every other key goes to
    `ComposerHFCausalLM`, e.g. `use_flash_attention_2`, `init_device`, `config_overrides`):
        pretrained_model_name_or_path: the source model, a local Hugging Face folder.
        l0_module: omit for continued pretraining (a plain causal LM that still reports per-domain
            losses to the `data_scheduler`). Its keys:
            target: the pruned shape, `{n_layers, hidden_size, n_heads, n_kv_heads, intermediate_size}`;
                sizes of modules not pruned stay the source's; `n_heads / n_kv_heads` must keep the
                source's query heads per KV group (whole KV groups are pruned).
            pruning_modules: any of `layer, head, intermediate, hidden` (default all).
            lagrangian_warmup: batches (`640` or `'640ba'`) over which the target sparsity ramps from 0.
            eval_masks: `current` (evals score the size the gates expect now, as the reference code) or
                `target` (the final shape).
            init: `uniform` (every gate at `init_log_alpha`, the paper) or `importance` (gates ordered by a
                calibration pass within `init_band` below `init_log_alpha`; needs `calibration`).
            init_log_alpha: the gates' starting log alpha (default ln 100: every gate almost surely open).
            init_band: log-alpha spread of the importance init (default 2.0).
            init_lambda_1, init_lambda_2: the Lagrange multipliers' starting values (default 0 and 0, the
                paper). A stiff start, `init_lambda_2: 3000`, keeps the expected sparsity on its scheduled
                target when the run is short (`drpruning/pruning/masks.py` says why).
            freeze_masks_at: batches (`'80ba'`); from then on training uses exactly the export's units and
                the gates and multipliers stop (default: never, the paper).
            calibration: where the importance pass reads its sequences (`CalibrationConfig`).
        distillation: optional `{teacher: source | DIR, weight: w, temperature: T}`: the training loss becomes
            (1 - w) CE + w T^2 KL(teacher || student) (`drpruning/pruning/distillation.py`).
    """

    TEACHER_PREFIX = "teacher."

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pretrained_model_name_or_path: str,
        l0_module: Mapping[str, Any] | None = None,
        distillation: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        options, calibration = (None, None) if l0_module is None else l0_module_options(l0_module)
        self.distillation = DistillationConfig.from_dict(distillation)
        if calibration is not None and tokenizer is not None:
            check_calibration_tokenizer(calibration, tokenizer)
        super().__init__(tokenizer=tokenizer, pretrained_model_name_or_path=pretrained_model_name_or_path, **kwargs)
        self.shape = ModelShape.from_hf_config(self.model.config)
        self.domain_stats = DomainStats()
        self.l0_module: L0Module | None = None
        # Read by the `pruning` callback at Event.INIT when the gates start from importance.
        self.calibration = calibration
        self._lagrangian: Tensor | None = None
        self._pruning_stats: dict[str, Tensor] = {}
        self.last_eval_masks: dict[str, Tensor] | None = None
        # Eval with all gates open (the source model); the `pruning` callback sets it for evals before step 1.
        self.evaluate_source = False
        if options is not None:
            self.l0_module = L0Module(self.shape, **options)
            self.mask_state = make_prunable(self.model, self.shape)
        self.distill_stats = DomainStats()
        self._teacher_logits: Tensor | None = None
        if self.distillation is not None:
            self.teacher = self._build_teacher(pretrained_model_name_or_path, tokenizer, kwargs.get("init_device", "cpu"))

    def _build_teacher(self, source: str, tokenizer: PreTrainedTokenizerBase | None, init_device: str) -> Any:
        """The frozen teacher: the source's weights (`teacher: source`) or another HF folder, checked to
        predict over the student's tokens, wrapped for FSDP like the student, never trained."""
        from llmfoundry.models.hf.hf_fsdp import prepare_hf_model_for_fsdp
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        assert self.distillation is not None
        folder = source if self.distillation.teacher == SOURCE_TEACHER else self.distillation.teacher
        if not Path(folder).is_dir():
            raise ConfigError(f"model.distillation.teacher {folder} is not a local Hugging Face folder")
        config = AutoConfig.from_pretrained(folder)
        teacher_vocab = None
        if self.distillation.teacher != SOURCE_TEACHER and tokenizer is not None:
            try:
                teacher_vocab = AutoTokenizer.from_pretrained(folder).get_vocab()
            except (OSError, ValueError):
                teacher_vocab = None  # a folder without tokenizer files: the vocabulary size is still checked
        check_teacher_fits(config, self.model.config, teacher_vocab,
                           None if tokenizer is None else tokenizer.get_vocab(), folder)  # fmt: skip
        teacher = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        teacher.requires_grad_(False)
        teacher.eval()
        prepare_hf_model_for_fsdp(teacher, init_device)
        teacher._fsdp_wrap = True  # its own FSDP unit: only frozen parameters in it
        return teacher

    def train(self, mode: bool = True) -> DRPruningCausalLM:
        super().train(mode)
        if "teacher" in self._modules:
            self.teacher.eval()  # the teacher always predicts in eval mode (no dropout)
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Without the teacher: it is rebuilt from its folder, never written into a checkpoint."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "") + self.TEACHER_PREFIX
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """A checkpoint holds no teacher: its keys are the only ones allowed to be missing."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(self.TEACHER_PREFIX)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                               f"unexpected keys {result.unexpected_keys}")  # fmt: skip
        return result

    def forward(self, batch: Mapping[str, Any]) -> Any:
        if self.l0_module is not None and not self.training and self.evaluate_source:
            self.mask_state.clear()
        elif self.l0_module is not None:
            masks, self._lagrangian, stats = self.l0_module()
            self.mask_state.set(masks)
            if self.training:
                # A copy: the multipliers in `stats` are views of parameters the optimizer step changes.
                self._pruning_stats = {name: value.clone() for name, value in stats.items()}
            else:
                self.last_eval_masks = masks
        # Labels are left out: `loss` computes token-level CE once, for the mean and the per-domain sums.
        inputs = {k: v for k, v in batch.items() if k in self.model_forward_args and k != "labels"}
        if self.distillation is not None and self.training:
            self._teacher_logits = teacher_logits(self.teacher, inputs)
        return self.model(**inputs, use_cache=False)

    def loss(self, outputs: Any, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        logits = outputs["logits"]
        token_loss, token_mask = next_token_losses(logits, batch["labels"])
        lm_loss = token_loss.sum() / token_mask.sum().clamp(min=1)
        if "domain" in batch:
            self.domain_stats.add(batch["domain"], token_loss.detach(), token_mask)
        losses = {"total": lm_loss, "lm_loss": lm_loss.detach()}
        if self.distillation is not None and self._teacher_logits is not None:
            teacher, self._teacher_logits = self._teacher_logits, None
            weight, temperature = self.distillation.weight, self.distillation.temperature
            token_distill = token_kl(logits[:, :-1], teacher[:, :-1], temperature) * temperature**2
            distill = (token_distill * token_mask).sum() / token_mask.sum().clamp(min=1)
            if "domain" in batch:
                self.distill_stats.add(batch["domain"], token_distill.detach(), token_mask)
            losses["total"] = (1.0 - weight) * lm_loss + weight * distill
            losses["distill_loss"] = distill.detach()
        if self._lagrangian is not None:
            losses["total"] = losses["total"] + self._lagrangian
            losses["lagrangian_loss"] = self._lagrangian.detach()
        return losses

    def pruning_stats(self) -> dict[str, float] | None:
        """Python floats from the last training forward (None without an l0_module or before training):
        `expected_sparsity/<m>`, `target_sparsity/<m>`, `lambda_1/<m>`, `lambda_2/<m>`, `expected_params`, and
        the constant `source_params`, `target_params`. The `pruning` callback logs them; the loss dict holds
        only losses."""
        if self.l0_module is None or not self._pruning_stats:
            return None
        stats = {k: float(v) for k, v in self._pruning_stats.items()}
        stats["source_params"] = float(self.l0_module.source.num_params())
        stats["target_params"] = float(self.l0_module.target.num_params())
        return stats
