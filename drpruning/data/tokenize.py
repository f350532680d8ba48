"""Text → token arrays for `prepare.py`: the tokenizer, documents tokenized in batches (long ones in pieces,
so memory stays bounded), and the packer that cuts the token stream into fixed-length sequences."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from drpruning.data.sources import iter_file_documents
from drpruning.errors import DataPrepError


def load_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerBase:
    """Load a local HF tokenizer directory (never the Hub: prep must be reproducible offline)."""
    if not Path(tokenizer_dir).is_dir():
        raise DataPrepError(f"tokenizer directory not found: {tokenizer_dir}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataPrepError(f"cannot load a tokenizer from {tokenizer_dir}: {e}") from e
    if tokenizer.eos_token_id is None:
        raise DataPrepError(f"tokenizer {tokenizer_dir} has no EOS token, needed to join documents")
    return tokenizer


class SequencePacker:
    """Concatenates token arrays and hands out full `seq_len` sequences; the remainder waits for more."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, tokens: np.ndarray) -> list[np.ndarray]:
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        if self._pending_tokens < self.seq_len:
            return []
        stream = np.concatenate(self._pending)
        full = len(stream) // self.seq_len * self.seq_len
        rest = stream[full:]
        self._pending = [rest] if len(rest) else []
        self._pending_tokens = len(rest)
        return list(stream[:full].reshape(-1, self.seq_len))

    def discard(self) -> int:
        """Drop the unfinished sequence and return how many tokens that threw away."""
        dropped = self._pending_tokens
        self._pending, self._pending_tokens = [], 0
        return dropped


# A tokenizer call's memory grows with its input (about 150x the text for a fast tokenizer): documents longer
# than PIECE_CHARS are tokenized in pieces, and a batch holds at most BATCH_CHARS of text, so memory stays
# bounded whatever the document length (benchmarks/README.md: prepare_data memory).
PIECE_CHARS = 1 << 20
BATCH_CHARS = 4 << 20


def text_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most about `size` characters, each cut where whitespace follows a
    non-space character (a line break when there is one in the last half of the piece).

    Pre-tokenizers of byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2) never join a non-space character
    with the whitespace after it, so the pieces' tokens are exactly the whole text's; a piece with no such
    place is cut at `size` (a run of `size` characters without a space)."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = -1
        for separators in ("\n", " \t\r\f\v"):
            cut = max(i for i in (_last_cut(text, start + size // 2, end, c) for c in separators))
            if cut > start:
                break
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _last_cut(text: str, low: int, high: int, char: str) -> int:
    """The last index i in (low, high] with text[i] == char and text[i - 1] not whitespace, else -1."""
    i = text.rfind(char, low, high + 1)
    while i > low:
        if not text[i - 1].isspace():
            return i
        i = text.rfind(char, low, i)
    return -1


def tokenized_documents(
    files: Sequence[Path],
    tokenizer: PreTrainedTokenizerBase,
    dtype: np.dtype,
    batch_documents: int,
    progress: tqdm,
    counts: dict[str, int],
) -> Iterator[np.ndarray]:
    """Token arrays (document + EOS) in file order; tokenizer calls are batched for throughput."""
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    done_bytes = 0
    for path in files:
        batch: list[str] = []
        position = 0
        batch_chars = 0
        for text, position in iter_file_documents(path, counts):
            if len(text) > PIECE_CHARS:
                yield from _encode_batch(batch, tokenizer, dtype, eos)
                batch, batch_chars = [], 0
                yield _encode_long(text, tokenizer, dtype, eos)
                progress.update(done_bytes + position - progress.n)
                continue
            batch.append(text)
            batch_chars += len(text)
            if len(batch) == batch_documents or batch_chars >= BATCH_CHARS:
                yield from _encode_batch(batch, tokenizer, dtype, eos)
                batch, batch_chars = [], 0
                progress.update(done_bytes + position - progress.n)
        if batch:
            yield from _encode_batch(batch, tokenizer, dtype, eos)
        done_bytes += path.stat().st_size
        progress.update(done_bytes - progress.n)


def _encode_long(text: str, tokenizer: PreTrainedTokenizerBase, dtype: np.dtype, eos: np.ndarray) -> np.ndarray:
    """One long document + EOS, tokenized piece by piece (`text_pieces`)."""
    parts = [np.asarray(tokenizer(piece, add_special_tokens=False, return_attention_mask=False)["input_ids"],
                        dtype=dtype) for piece in text_pieces(text, PIECE_CHARS)]  # fmt: skip
    return np.concatenate([*parts, eos])


def _encode_batch(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, dtype: np.dtype, eos: np.ndarray
) -> Iterator[np.ndarray]:
    if not texts:
        return
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    for ids in encoded:
        yield np.concatenate([np.asarray(ids, dtype=dtype), eos])


