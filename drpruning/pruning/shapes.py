"""Decoder shapes: what a Llama-family model looks like, what a pruning target may be, and exact sizes.

A pruning target is a smaller *stock* architecture (uniform across layers), so the pruned model is a
plain Hugging Face config. Everything here is pure Python so it can validate yamls without weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from drpruning.errors import ShapeError
from drpruning.pruning.architectures import architecture

PRUNING_MODULES = ("layer", "head", "intermediate", "hidden")
UNIT_COUNT_KEYS = {"layer": "n_layers", "head": "n_kv_heads", "intermediate": "intermediate_size",
                   "hidden": "hidden_size"}
"""The `ModelShape` field that counts each module's units (a KV group is one `head` unit)."""
PER_LAYER_MODULES = ("head", "intermediate")
"""Modules whose mask has one row per layer."""
TARGET_KEYS = ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "intermediate_size")



@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder that pruning can change, plus what fixes its parameter count."""

    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    head_norms: int = 0
    """Norm weights over head_dim per layer (Qwen3's q_norm and k_norm: 2): unchanged by pruning."""

    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelShape:
        """Read the shape of a supported HF config (`architectures.py`), or of its dict form."""
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        arch = architecture(get("model_type"))
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        kv_heads = int(get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ShapeError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        return cls(
            n_layers=int(get("num_hidden_layers")),
            hidden_size=hidden,
            n_heads=heads,
            n_kv_heads=kv_heads,
            head_dim=int(get("head_dim") or hidden // heads),
            intermediate_size=int(get("intermediate_size")),
            vocab_size=int(get("vocab_size")),
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=arch.has_bias("qkv", get),
            o_bias=arch.has_bias("out", get),
            mlp_bias=arch.has_bias("mlp", get),
            head_norms=len(arch.head_norms),
        )

    def hf_config_updates(self) -> dict[str, int]:
        """The HF config keys that describe this shape (head_dim explicit, so RoPE and scaling survive)."""
        return {
            "num_hidden_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
        }

    def target_dict(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in TARGET_KEYS}

    def num_params(self) -> int:
        """Exact parameter count of the HF model of this shape (equals `sum(p.numel())`)."""
        per_layer = self.params_per_layer(self.n_kv_heads, self.intermediate_size, self.hidden_size)
        return self.n_layers * per_layer + self.params_outside_layers(self.hidden_size)

    # The one parameter-count formula. Written for plain numbers and for tensors alike, so the L0 module's
    # expected size (soft counts of KV groups, FFN units and hidden dims) uses exactly this arithmetic.
    def params_per_layer(self, kv_groups: Any, units: Any, dims: Any) -> Any:
        """One decoder layer with `kv_groups` KV groups (their query heads), `units` FFN units, `dims` hidden
        dims, with this model's head_dim, heads per group and biases: attention + MLP + two norms."""
        hd, g = self.head_dim, self.heads_per_group
        attention = kv_groups * (dims * hd * (2 * g + 2) + self.qkv_bias * hd * (g + 2)) + self.o_bias * dims
        attention = attention + self.head_norms * hd
        mlp = 3 * dims * units + self.mlp_bias * (2 * units + dims)
        return attention + mlp + 2 * dims

    def params_outside_layers(self, dims: Any) -> Any:
        """Embeddings (and the LM head unless tied) plus the final norm, at `dims` hidden dims."""
        return self.vocab_size * dims * (1 if self.tie_embeddings else 2) + dims


def target_shape(source: ModelShape, target: Mapping[str, Any], pruning_modules: Iterable[str]) -> ModelShape:
    """Validate a target architecture against the source and the modules allowed to shrink.

    `target` holds the keys of `TARGET_KEYS`; `n_kv_heads` may be left out, in which case it follows from
    keeping the number of query heads per KV group fixed (a KV group is pruned as a whole).
    """
    modules = list(pruning_modules)
    unknown_modules = sorted(set(modules) - set(PRUNING_MODULES))
    if unknown_modules:
        raise ShapeError(f"unknown pruning_modules {unknown_modules}; choose from {list(PRUNING_MODULES)}")
    if not modules:
        raise ShapeError("pruning_modules is empty: nothing would be pruned")
    unknown_keys = sorted(set(target) - set(TARGET_KEYS) - {"head_dim"})
    if unknown_keys:
        raise ShapeError(f"unknown target keys {unknown_keys}; a target has {list(TARGET_KEYS)}")

    values: dict[str, int] = {}
    for key in TARGET_KEYS:
        value = target.get(key)
        if value is None and key == "n_kv_heads" and target.get("n_heads") is not None:
            n_heads = _positive_int("n_heads", target["n_heads"])
            if n_heads % source.heads_per_group:
                raise ShapeError(
                    f"target n_heads={n_heads} is not a multiple of the source's {source.heads_per_group} "
                    "query heads per KV group (groups are pruned whole, so that ratio is fixed)"
                )
            value = n_heads // source.heads_per_group
        if value is None:
            value = getattr(source, key)
        values[key] = _positive_int(key, value)
        if values[key] > getattr(source, key):
            raise ShapeError(f"target {key}={values[key]} is larger than the source's {getattr(source, key)}")

    if values["n_heads"] != values["n_kv_heads"] * source.heads_per_group:
        raise ShapeError(
            f"target n_heads={values['n_heads']}, n_kv_heads={values['n_kv_heads']} breaks the source's "
            f"{source.heads_per_group} query heads per KV group ({source.n_heads}/{source.n_kv_heads}); "
            "KV groups are pruned whole, so keep that ratio"
        )
    if "head_dim" in target and int(target["head_dim"]) != source.head_dim:
        raise ShapeError(f"target head_dim={target['head_dim']} differs from the source's {source.head_dim}; "
                         "pruning keeps the head dimension")

    needed = {
        "layer": values["n_layers"] != source.n_layers,
        "head": values["n_kv_heads"] != source.n_kv_heads,
        "intermediate": values["intermediate_size"] != source.intermediate_size,
        "hidden": values["hidden_size"] != source.hidden_size,
    }
    missing = [m for m, changes in needed.items() if changes and m not in modules]
    if missing:
        raise ShapeError(
            f"the target shrinks {missing} but pruning_modules={modules} does not include them; "
            "add them or keep those sizes equal to the source"
        )
    return dataclasses.replace(source, **values)


def module_sizes(shape: ModelShape) -> dict[str, int]:
    """Units per mask row for each pruning module (a KV group is one `head` unit)."""
    return {module: getattr(shape, key) for module, key in UNIT_COUNT_KEYS.items()}


def mask_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """The shape of each module's mask: one row per layer for the per-layer modules, one row otherwise."""
    sizes = module_sizes(shape)
    return {m: (shape.n_layers, sizes[m]) if m in PER_LAYER_MODULES else (sizes[m],) for m in PRUNING_MODULES}


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ShapeError(f"target {key}={value!r} is not an integer")
    if value < 1:
        raise ShapeError(f"target {key}={value} leaves zero units; every dimension needs at least one")
    return int(value)
