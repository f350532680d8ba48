"""Write an export: a dense HF model, its tokenizer and `pruning.json`, into a folder that holds nothing else.

The folder is written all or nothing (`drpruning.atomic.staged_directory`), and `check_out_dir` refuses a
folder whose replacement would destroy something: the input, or files a previous export did not write.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from composer.models.huggingface import HuggingFaceModel
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from drpruning.atomic import is_scratch_name, replace_directory, staged_directory
from drpruning.errors import ExportError

SUMMARY_FILE = "pruning.json"
# Every file `save_pretrained` of a causal LM and its tokenizer can write, plus the summary: what a previous
# export may hold. `--overwrite` replaces a folder only if it holds nothing else.
_EXPORT_FILE = re.compile(
    r"^(config\.json|generation_config\.json|pruning\.json|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json"
    r"|added_tokens\.json|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json))$"
)


def check_out_dir(out_dir: Path, overwrite: bool, source: Path) -> None:
    """Refuse an OUT_DIR that would destroy something: the input (or a folder around or inside it), or,
    with `overwrite`, anything but a previous export (recognised by its pruning.json and export files only)."""
    out, source = out_dir.resolve(), source.resolve()
    if out == source or source in out.parents:
        where = "is" if out == source else "lies inside"
        raise ExportError(f"{out_dir} {where} the input {source}; write the export to a folder outside it")
    if out in source.parents:
        raise ExportError(f"{out_dir} contains the input {source}; write the export to a folder outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    entries = [p for p in out_dir.iterdir() if not is_scratch_name(p.name)] if out_dir.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    if not (out_dir / SUMMARY_FILE).is_file():
        raise ExportError(f"{out_dir} is not a previous export (no {SUMMARY_FILE}); --overwrite replaces only an "
                          "export, so choose an empty or new folder")  # fmt: skip
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in entries
                     if p.is_dir() or not _EXPORT_FILE.match(p.name))  # fmt: skip
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportError(f"{out_dir} holds files an export does not write ({shown}); --overwrite replaces only a "
                          "previous export, so move them away or choose another folder")  # fmt: skip


def _load_embedded(embedded: Mapping[str, Any], files: str) -> PreTrainedTokenizerBase | None:
    """The tokenizer Composer saved inside the checkpoint (its reader writes the files to a folder first)."""
    return HuggingFaceModel.load_huggingface_tokenizer_from_saved_state({"tokenizer": dict(embedded)},
                                                                         tokenizer_save_dir=files)  # fmt: skip


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, origin: str,
                         trained_with: PreTrainedTokenizerBase | None = None) -> None:  # fmt: skip
    """Refuse a tokenizer that does not fit the model: more tokens than its embedding rows, special-token ids
    other than the config's, or (when the run's own tokenizer is known) another vocabulary than it."""
    size, rows = len(tokenizer), int(config.vocab_size)
    if size > rows:
        raise ExportError(f"the tokenizer from {origin} has {size:,} tokens but the model has {rows:,} embedding rows: "
                          "it is not the tokenizer the model was trained with")  # fmt: skip
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids, expected = getattr(tokenizer, name, None), getattr(config, name, None)
        allowed = set(expected) if isinstance(expected, list) else {expected}
        if ids is not None and expected is not None and ids not in allowed:
            raise ExportError(f"the tokenizer from {origin} has {name}={ids} but the model's config says {expected}")
    if trained_with is not None and tokenizer.get_vocab() != trained_with.get_vocab():
        raise ExportError(f"the tokenizer from {origin} differs from the one saved in the checkpoint (the run's "
                          f"own: {len(trained_with):,} tokens, this one {size:,}); omit --tokenizer to use the "
                          "checkpoint's")  # fmt: skip


def _save_tokenizer(out_dir: Path, config: PretrainedConfig, override: str | Path | None, source: str | None,
                    embedded: Mapping[str, Any] | None) -> str:  # fmt: skip
    """Tokenizer files from the checkpoint (the run's own), else --tokenizer, else the source model dir; an
    explicit --tokenizer must match the checkpoint's, and whatever is written must fit the model."""
    with tempfile.TemporaryDirectory() as files:
        own = _load_embedded(embedded, files) if embedded else None
        if override is not None:
            tokenizer, origin = AutoTokenizer.from_pretrained(str(override)), str(override)
        elif own is not None:
            tokenizer, origin = own, "checkpoint"
        elif source is not None and Path(source).is_dir():
            tokenizer, origin = AutoTokenizer.from_pretrained(str(source)), str(source)
        else:
            raise ExportError("no tokenizer found: the checkpoint holds none and the source dir is missing; "
                              "pass --tokenizer")  # fmt: skip
        check_tokenizer_fits(tokenizer, config, "the checkpoint" if origin == "checkpoint" else origin,
                             trained_with=own if origin != "checkpoint" else None)  # fmt: skip
        tokenizer.save_pretrained(str(out_dir))
    return origin


def save_export(
    dense: PreTrainedModel,
    summary: Mapping[str, Any],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    tokenizer: str | Path | None = None,
    source: str | None = None,
    embedded_tokenizer: Mapping[str, Any] | None = None,
    input_path: str | Path,
) -> Path:
    """Write `dense`, its tokenizer and `pruning.json` to `out_dir` through a staging folder (all or nothing).

    `input_path` (the checkpoint, run folder or source model read) is never inside, around or equal to it."""
    out_dir, input_path = Path(out_dir), Path(input_path)
    check_out_dir(out_dir, overwrite, input_path)
    summary = dict(summary)

    def install(staging: Path, out: Path) -> None:
        check_out_dir(out, overwrite, input_path)  # again: the folder may have been filled while we worked
        replace_directory(staging, out)

    need = sum(p.numel() * p.element_size() for p in dense.parameters())  # the weights; the rest is small
    with staged_directory(out_dir, install, need_bytes=need) as staging:
        dense.save_pretrained(str(staging), safe_serialization=True)
        summary["tokenizer"] = _save_tokenizer(staging, dense.config, tokenizer, source, embedded_tokenizer)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return out_dir
