"""The `pruning` callback: feeds the train step to the masks, keeps log alpha in range, checks that the
optimizer trains masks and Lagrange multipliers as the method needs, logs the masks' statistics each step
and the size of the model each eval scored, and dumps the target-shape masks (the architecture an export
at that step would keep).
With `l0_module.init: importance` it also orders the gates by a calibration pass at Event.INIT, before
DDP/FSDP wrapping and before a checkpoint is loaded (so a resumed run's checkpointed gates win).
The L0 module stays out of FSDP (fp32 gate maths under bf16); what that takes, replication, gradient
averaging and its own clipping norm, is `drpruning/pruning/l0_training.py`.

Registered in LLM-Foundry as `pruning`; a pruning yaml lists it as `callbacks: {pruning: {}}`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from drpruning.errors import ConfigError
from drpruning.pruning.importance import Importance, importance_for_run, write_importance
from drpruning.pruning.l0_training import average_gradients_, replace_gradient_clipping_, replicate_
from drpruning.pruning.masks import L0Module
from drpruning.pruning.shapes import module_sizes
from drpruning.runs import (
    EVAL_MASKS_KEPT_PREFIX,
    EVAL_MASKS_PARAMS_KEY,
    MASKS_DIR,
    MASKS_META_FILE,
    PRUNING_METRICS_PREFIX,
    check_run_folder,
    masks_file,
    run_folder,
    start_run_in_folder,
    unwrap_model,
    write_json,
)

# Sizes that never change during a run; `masks/meta.json` holds them, so they are not logged each step.
CONSTANT_STATS = ("source_params", "target_params")

OPTIMIZER_HELP = """\
optimizer:
  name: decoupled_adamw
  lr: 1.0e-4
  param_groups:
    - {param_str_match: 'l0_module\\.lambda_', lr: -1.0, weight_decay: 0.0}   # ascent on the multipliers
    - {param_str_match: 'l0_module\\.gates\\.', lr: 1.0, weight_decay: 0.0}"""


class PruningCallback(Callback):
    """Drives and records an `L0Module` training run.

    yaml (LLM-Foundry registers it as `pruning`):
        callbacks:
          pruning:
            save_masks: true

    Args:
        save_masks: write `<run folder>/masks/ba<step>.pt` after every eval: the target-count masks, i.e.
            the architecture an export at that step keeps (whatever `eval_masks` the evals score), and
            `masks/meta.json`. Default true.
        clip_l0_gradients: the yaml's `gradient_clipping` always clips the model's weights alone; true also
            clips the gates' and multipliers' gradients, on a norm of their own (the reference's FSDP1
            behaviour). Default false: Adam alone sets their step (`drpruning/pruning/l0_training.py`).

    Logs each train step `metrics/pruning/<stat>/<module>` (expected and target sparsity, the multipliers
    λ1 and λ2) and `metrics/pruning/expected_params`, and after each eval `metrics/eval_masks/*`.
    """

    def __init__(self, save_masks: bool = True, clip_l0_gradients: bool = False):
        self.save_masks = save_masks
        self.clip_l0_gradients = clip_l0_gradients
        self.metadata: dict[str, Any] = {}
        self._l0_groups: list[int] = []  # optimizer param groups of gates and multipliers (group order survives wrapping)
        self._average_l0_gradients = False  # under FSDP, which leaves the L0 module to us (l0_training.py)
        # Set by the importance pass at INIT, written (and dropped) at FIT_START once the run folder is the run's.
        self._importance: Importance | None = None
        self._one_shot_masks: dict[str, torch.Tensor] = {}

    @staticmethod
    def _model(state: State) -> Any:
        """The pruning model (a `DRPruningCausalLM` with an `l0_module`) inside any DDP wrapper."""
        model = unwrap_model(state.model)
        if getattr(model, "l0_module", None) is None:
            raise ConfigError(
                "the `pruning` callback needs a model with an `l0_module` block (model.name: drpruning_causal_lm); "
                "remove the callback for continued pretraining"
            )
        return model

    def _l0(self, state: State) -> L0Module:
        return self._model(state).l0_module

    def init(self, state: State, logger: Logger) -> None:
        model = self._model(state)
        l0 = model.l0_module
        l0.noise_seed, l0.noise_rank = int(state.rank_zero_seed), dist.get_global_rank()
        # Saved in every checkpoint (callback state) and next to the masks: what export needs to rebuild shapes.
        self.metadata = {
            "l0": l0.describe(),
            "source": str(model.model.config.name_or_path),
            "hf_config": model.model.config.to_dict(),
        }
        # Checked before DDP/FSDP wrapping, while optimizer params are still the model's own objects.
        if state.optimizers:
            self._l0_groups = check_optimizer_groups(model, state.optimizers[0])
        if l0.init == "importance":
            self._order_gates(state, model, l0)
        # Under DDP the wrapping copies rank 0's parameters (the L0 module's included); FSDP leaves it out.
        replicate_(l0, state.device.tensor_to_device(torch.empty(0)).device, broadcast=state.fsdp_config is not None)
        replace_gradient_clipping_(state, self.clip_l0_gradients)

    def _order_gates(self, state: State, model: Any, l0: L0Module) -> None:
        """Gates ordered by importance (rank 0's pass, broadcast). Its files (`importance.pt`, and
        `masks/ba0.pt` = the one-shot selection) are written at FIT_START, once the run folder is the run's."""
        importance = importance_for_run(model.model, model.calibration, run_folder(state),
                                        source=self.metadata["source"])  # fmt: skip
        l0.order_gates_(importance.scores)
        self.metadata["importance"] = {"calibration": importance.meta.get("calibration"), "cost": importance.cost()}
        self._importance = importance
        self._one_shot_masks = {m: t.detach().cpu() for m, t in l0.target_masks().items()}

    def _write_importance(self, state: State) -> None:
        importance, self._importance = self._importance, None
        if importance is None or dist.get_global_rank() != 0:
            return
        folder = run_folder(state)
        write_importance(importance, folder)
        if self.save_masks:
            masks_file(folder, 0).parent.mkdir(parents=True, exist_ok=True)
            torch.save(self._one_shot_masks, masks_file(folder, 0))

    def after_load(self, state: State, logger: Logger) -> None:
        check_run_folder(state)

    def eval_standalone_start(self, state: State, logger: Logger) -> None:
        start_run_in_folder(state)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._average_l0_gradients = state.fsdp_enabled and dist.get_world_size() > 1
        start_run_in_folder(state)  # before the first write: an earlier run in the folder is refused or moved
        self._write_importance(state)
        if self.save_masks:
            write_json(run_folder(state) / MASKS_DIR / MASKS_META_FILE, self.metadata)

    def batch_start(self, state: State, logger: Logger) -> None:
        l0 = self._l0(state)
        l0.train_step = int(state.timestamp.batch)
        if l0.masks_frozen(l0.train_step) and state.optimizers:
            # The LR scheduler recomputes every group's lr after each step; this runs after it, before the next.
            for index in self._l0_groups:
                state.optimizers[0].param_groups[index]["lr"] = 0.0

    def after_backward(self, state: State, logger: Logger) -> None:
        if self._average_l0_gradients:
            average_gradients_(self._l0(state))

    def after_train_batch(self, state: State, logger: Logger) -> None:
        """The statistics of this step's forward, logged once per batch (after every microbatch, before the
        optimizer step, at the same step as its `loss/train/*`). Every rank holds the same values."""
        stats = self._model(state).pruning_stats()
        if stats is not None:
            logger.log_metrics({PRUNING_METRICS_PREFIX + name: value for name, value in stats.items()
                                if name not in CONSTANT_STATS})  # fmt: skip

    def batch_end(self, state: State, logger: Logger) -> None:
        self._l0(state).clamp_log_alpha_()

    def eval_start(self, state: State, logger: Logger) -> None:
        # Before the first step the target-shape masks are arbitrary (all gates equal): evaluate the source
        # model instead, which is what the run starts from and what `reference_losses: source` must measure.
        self._model(state).evaluate_source = int(state.timestamp.batch) == 0

    def eval_after_all(self, state: State, logger: Logger) -> None:
        model = self._model(state)
        l0 = model.l0_module
        step = int(state.timestamp.batch)
        # The size of the model these evals scored (the `eval_masks` choice), so plots can show it.
        if model.evaluate_source or model.last_eval_masks is None:  # all gates open: the source model
            sizes = module_sizes(l0.source)
            metrics = {f"{EVAL_MASKS_KEPT_PREFIX}{m}": float(sizes[m]) for m in l0.pruning_modules}
            metrics[EVAL_MASKS_PARAMS_KEY] = float(l0.source.num_params())
        else:
            scored = {m: t.detach().float().cpu() for m, t in model.last_eval_masks.items()}
            metrics = {f"{EVAL_MASKS_KEPT_PREFIX}{m}": kept for m, kept in L0Module.mean_kept_per_row(scored).items()}
            metrics[EVAL_MASKS_PARAMS_KEY] = float(l0.expected_params(scored))
        logger.log_metrics(metrics)
        masks = l0.last_target_masks
        if not self.save_masks or step == 0 or masks is None or dist.get_global_rank() != 0:
            return
        folder = run_folder(state)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({m: t.detach().cpu() for m, t in masks.items()}, masks_file(folder, step))

    def state_dict(self) -> dict[str, Any]:
        return dict(self.metadata)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("l0")
        current = self.metadata.get("l0")
        if saved and current and saved["target_shape"] != current["target_shape"]:
            raise ConfigError(
                f"the checkpoint was pruned toward {saved['target_shape']} but this run's l0_module targets "
                f"{current['target_shape']}; resume with the original target or start a new run"
            )


def check_optimizer_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[int]:
    """Multipliers must be trained by ascent in groups of their own; masks should not share the model's lr.

    Returns the indices of the groups that hold only L0 parameters (gates, multipliers)."""
    names = {id(p): n for n, p in model.named_parameters()}
    lambda_groups, gate_lrs, base_lr, l0_groups = [], [], None, []
    for index, group in enumerate(optimizer.param_groups):
        lr = group.get("initial_lr", group["lr"])
        group_names = [names.get(id(p), "") for p in group["params"]]
        is_lambda = ["l0_module.lambda_" in n for n in group_names]
        if any(is_lambda):
            if not all(is_lambda) or lr >= 0:
                raise ConfigError(
                    "the Lagrange multipliers (l0_module.lambda_*) must be in a param group of their own with a "
                    f"negative lr (gradient ascent); found lr={lr} with {len(group_names)} params. Use:\n"
                    + OPTIMIZER_HELP
                )
            lambda_groups.append(lr)
        if any("l0_module.gates." in n for n in group_names):
            gate_lrs.append(lr)
        if any("l0_module." not in n for n in group_names):
            base_lr = lr if base_lr is None else base_lr
        elif group_names:
            l0_groups.append(index)
    if not lambda_groups:
        raise ConfigError("no optimizer param group holds the Lagrange multipliers. Use:\n" + OPTIMIZER_HELP)
    if base_lr is not None and any(lr == base_lr for lr in gate_lrs):
        warnings.warn(
            f"the mask gates train at the model's lr ({base_lr}); the method uses lr 1.0 for them. Use:\n"
            + OPTIMIZER_HELP,
            stacklevel=2,
        )
    return l0_groups
