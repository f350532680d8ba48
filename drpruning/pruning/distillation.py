"""Logit distillation from a frozen teacher (Minitron, Sect. 3): the student's training loss becomes

    (1 - w) * CE + w * T^2 * KL(teacher_T || student_T)

over next-token distributions at temperature T, averaged over the target tokens. `teacher: source` in a
pruning run is a frozen copy of the source weights; any other value names a Hugging Face folder (typically
the unpruned source, for continued pretraining of an export). The data scheduler is untouched: it reads the
student's plain LM loss (eval), and the per-domain distillation loss of training is logged beside it.

The teacher is a child module of the Composer model, so FSDP shards it like the student (its decoder layers
and the teacher as a whole are wrap units of their own, holding only frozen parameters); it is never in a
checkpoint (the model's `state_dict` leaves it out) and is rebuilt from its folder on resume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from drpruning.errors import ConfigError

DISTILLATION_KEYS = ("teacher", "weight", "temperature")
SOURCE_TEACHER = "source"


@dataclasses.dataclass(frozen=True)
class DistillationConfig:
    """The `model.distillation` block.

    Args:
        teacher: `source` (the model being pruned, frozen at its starting weights) or a local HF folder.
        weight: w in [0, 1]; 0 is the plain LM loss, 1 distillation alone.
        temperature: T > 0 of both distributions; the KL term is scaled by T^2 so its gradients keep their size.
    """

    teacher: str = SOURCE_TEACHER
    weight: float = 0.5
    temperature: float = 1.0

    @classmethod
    def from_dict(cls, block: Mapping[str, Any] | None) -> DistillationConfig | None:
        if block is None:
            return None
        if not isinstance(block, Mapping):
            raise ConfigError(f"model.distillation must be a mapping {{teacher, weight, temperature}}, got {block!r}")
        unknown = sorted(set(block) - set(DISTILLATION_KEYS))
        if unknown:
            raise ConfigError(f"unknown model.distillation keys {unknown}; known: {list(DISTILLATION_KEYS)}")
        config = cls(**dict(block))
        if not isinstance(config.teacher, str) or not config.teacher:
            raise ConfigError(f"model.distillation.teacher must be 'source' or a folder, got {config.teacher!r}")
        for name, value in (("weight", config.weight), ("temperature", config.temperature)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"model.distillation.{name} must be a number, got {value!r}")
        if not 0.0 <= config.weight <= 1.0:
            raise ConfigError(f"model.distillation.weight={config.weight} must lie in [0, 1]")
        if not config.temperature > 0:
            raise ConfigError(f"model.distillation.temperature={config.temperature} must be positive")
        return config


def token_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher_T || student_T) per position, in fp32: [..., V] logits -> [...] values."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1)


def check_teacher_fits(teacher_config: Any, student_config: Any, teacher_vocab: Mapping[str, int] | None,
                       student_vocab: Mapping[str, int] | None, where: str) -> None:  # fmt: skip
    """Refuse a teacher whose next-token distribution is over other tokens than the student's."""
    if int(teacher_config.vocab_size) != int(student_config.vocab_size):
        raise ConfigError(f"distillation teacher {where} has a vocabulary of {teacher_config.vocab_size:,} tokens, the "
                          f"student {student_config.vocab_size:,}: their distributions cannot be compared")  # fmt: skip
    if teacher_vocab is not None and student_vocab is not None and teacher_vocab != student_vocab:
        raise ConfigError(f"distillation teacher {where} uses another tokenizer than the student (same size, "
                          "different tokens)")  # fmt: skip


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    """The teacher's logits for the student's inputs (eval mode, no graph)."""
    return teacher(**inputs, use_cache=False).logits
