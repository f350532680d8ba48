"""Prepared data in remote storage: read through a local cache, and upload after preparation.

A `prepare_data` folder (manifest.json + <domain>/{train,eval}/ MDS) can live at any remote that
mosaicml-streaming supports (`s3://`, `gs://`, `oci://`, `azure://`, `hf://`, a path on a shared
filesystem, ...). Readers name it as `remote` and keep `data_dir` as the local cache:

- `fetch_manifest` copies `manifest.json` into the cache once and pins the cache to that remote;
- `CachedSplit` is streaming's `LocalDataset` over the cached split whose shards are downloaded on first
  access or ahead of it (`shard_cache.py`), through streaming's own `Stream.prepare_shard` (its
  downloaders, retries, decompression), one process or thread at a time per shard (a file lock: ranks,
  dataloader workers and prefetch threads share the cache), and checked against the split's `index.json`
  (size; hash when the index has one). A later run finds them cached.
- `upload_prepared` copies a finished local folder to a remote with streaming's `CloudUploader`
  (`scripts/prepare_data.py --remote URL`, `drpruning/data/prepare_cli.py`).

What is read is exactly what a local copy of the folder holds, so the mixer's determinism, bit-exact
resume and world-size independence do not depend on where the data lives. The cache is not refreshed:
data re-prepared at the same remote needs a new cache folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from streaming.base.format import get_index_basename
from streaming.base.hashing import get_hash
from streaming.base.local import LocalDataset
from streaming.base.storage import CloudDownloader, CloudUploader
from streaming.base.stream import Stream

from drpruning.data.manifest import MANIFEST_NAME
from drpruning.errors import RemoteDataError

REMOTE_MARKER = ".remote"
DEFAULT_DOWNLOAD_TIMEOUT = 60.0
DEFAULT_DOWNLOAD_RETRY = 2



_downloaders = threading.local()


def _thread_downloader(remote: str) -> CloudDownloader:
    """One streaming downloader per thread and storage scheme, shared by every split. A downloader is not
    safe across threads (a retry drops its client), and making one per split is slow: an S3 client takes
    a few hundred ms of CPU to build."""
    cache = _downloaders.__dict__.setdefault("by_scheme", {})
    scheme = urllib.parse.urlparse(remote).scheme
    if scheme not in cache:
        cache[scheme] = CloudDownloader.get(remote)
    return cache[scheme]


def join_remote(remote: str, *parts: str) -> str:
    """`remote/part/...` for a URL or a path, the way streaming joins its own remote paths."""
    return os.path.join(remote, *parts)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if needed), shared by every process of this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(remote_file: str, local_file: Path, timeout: float) -> None:
    """Fetch one file with streaming's downloader into a private temporary name, then move it into place."""
    tmp = local_file.with_name(f"{local_file.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        CloudDownloader.direct_download(remote_file, str(tmp), timeout)
    except Exception as error:
        tmp.unlink(missing_ok=True)
        raise RemoteDataError(f"cannot download {remote_file}: {type(error).__name__}: {error}") from error
    os.replace(tmp, local_file)


def fetch_manifest(remote: str, data_dir: str | Path, timeout: float = DEFAULT_DOWNLOAD_TIMEOUT) -> Path:
    """Make `data_dir` the cache of `remote`: copy its manifest.json there once; returns the manifest path.

    Safe to call from every rank at once. A cache folder already bound to another remote is an error.
    """
    cache = Path(data_dir)
    manifest, marker = cache / MANIFEST_NAME, cache / REMOTE_MARKER
    with _locked(cache / f".{MANIFEST_NAME}.lock"):
        if manifest.exists():
            bound = marker.read_text(encoding="utf-8") if marker.is_file() else None
            if bound is None:
                raise RemoteDataError(
                    f"{cache} already holds a {MANIFEST_NAME} not fetched from a remote: give an empty or new "
                    f"data_dir as the cache of {remote!r}"
                )
            if bound != remote:
                raise RemoteDataError(
                    f"cache folder {cache} holds data from remote {bound!r}, not {remote!r}: give another data_dir"
                )
        else:
            # The marker goes first, so an interrupted fetch is retried rather than refused as foreign.
            marker.write_text(remote, encoding="utf-8")
            _download(join_remote(remote, MANIFEST_NAME), manifest, timeout)
    return manifest


class CachedSplit(LocalDataset):
    """Streaming's map-style `LocalDataset` over one remote MDS split, cached locally shard by shard.

    The split's index.json is fetched at construction; each shard when a sample of it is first read, or
    earlier by `fetch` (drpruning/data/shard_cache.py prefetches from a thread). A shard removed from the
    cache (`evict`, possibly by another process sharing it) is fetched again when next read.
    """

    def __init__(self, remote: str, local: str | Path, split: str,
                 download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT, download_retry: int = DEFAULT_DOWNLOAD_RETRY):
        self.remote_dir = join_remote(remote, split)
        self._stream_settings = {"remote": remote, "local": str(local), "split": split, "keep_zip": False,
                                 "download_timeout": download_timeout, "download_retry": download_retry}
        self._streams = threading.local()
        index = Path(local) / split / get_index_basename()
        with _locked(index.with_name(f".{index.name}.lock")):
            if not index.is_file():
                _download(join_remote(self.remote_dir, index.name), index, download_timeout)
        super().__init__(local=str(local), split=split)
        for shard in self.shards:
            shard.validate(allow_unsafe_types=False)
        self._shard_ends = np.cumsum([shard.samples for shard in self.shards])
        self._ready: set[int] = set()
        self._count_lock = threading.Lock()
        self.fetched_bytes = 0
        """Bytes of the shards this process downloaded (shards found in the cache count nothing)."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_streams"], state["_count_lock"]  # dataloader workers make their own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._streams, self._count_lock = threading.local(), threading.Lock()

    @property
    def stream(self) -> Stream:
        """Streaming's `Stream` for this split, one per thread, with the thread's downloader (below)."""
        if not hasattr(self._streams, "stream"):
            stream = Stream(**self._stream_settings)
            stream._downloader = _thread_downloader(self.remote_dir)  # streaming 0.12 keeps it there
            self._streams.stream = stream
        return self._streams.stream

    def shards_of(self, sample_ids: np.ndarray) -> np.ndarray:
        """The shard that holds each sample."""
        return np.searchsorted(self._shard_ends, np.asarray(sample_ids, dtype=np.int64), side="right")

    def shard_bytes(self, shard_id: int) -> int:
        """Bytes the shard takes in the cache."""
        return sum(raw.bytes for raw, _ in self.shards[shard_id].file_pairs)

    def is_ready(self, shard_id: int) -> bool:
        return shard_id in self._ready

    def get_item(self, sample_id: int) -> dict[str, Any]:
        shard_id, index_in_shard = self.spanner[sample_id]
        for attempt in range(2):
            if shard_id not in self._ready:
                self.fetch(shard_id)
            try:
                return self.shards[shard_id][index_in_shard]
            except FileNotFoundError:  # evicted since it was fetched (by this process or another one)
                self._ready.discard(shard_id)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def fetch(self, shard_id: int) -> None:
        """Make the shard's files present and checked in the cache (a no-op for a shard already there)."""
        if shard_id not in self._ready:
            self._fetch_shard(shard_id)
            self._ready.add(shard_id)

    def evict(self, shard_id: int) -> None:
        """Remove the shard's files from the cache (readers fetch it again when they need it)."""
        shard = self.shards[shard_id]
        local_dir = Path(self.local) / self.split
        first = shard.file_pairs[0][1] or shard.file_pairs[0][0]
        self._ready.discard(shard_id)
        with _locked(local_dir / f".{first.basename}.lock"):
            for raw, _ in shard.file_pairs:
                (local_dir / raw.basename).unlink(missing_ok=True)

    def _fetch_shard(self, shard_id: int) -> None:
        """Download the shard unless a complete copy is cached, and check it against the index."""
        shard = self.shards[shard_id]
        local_dir = Path(self.local) / self.split
        first = shard.file_pairs[0][1] or shard.file_pairs[0][0]  # what is downloaded: the zip if any
        name = join_remote(self.remote_dir, first.basename)
        with _locked(local_dir / f".{first.basename}.lock"):
            fresh = False
            for raw, _ in shard.file_pairs:
                path = local_dir / raw.basename
                if path.is_file() and path.stat().st_size != raw.bytes:
                    path.unlink()  # an interrupted or damaged copy: fetch it again
                fresh |= not path.is_file()
            try:
                self.stream.prepare_shard(shard)
            except Exception as error:
                raise RemoteDataError(f"cannot fetch shard {name}: {type(error).__name__}: {error}") from error
            for raw, _ in shard.file_pairs:
                path = local_dir / raw.basename
                problem = self._mismatch(path, raw, check_hash=fresh)
                if problem:
                    path.unlink(missing_ok=True)
                    raise RemoteDataError(f"shard {name} is corrupt: {problem} (its {get_index_basename()} "
                                          f"in {self.remote_dir} disagrees)")
            if fresh:
                with self._count_lock:
                    self.fetched_bytes += self.shard_bytes(shard_id)

    @staticmethod
    def _mismatch(path: Path, info: Any, check_hash: bool) -> str | None:
        size = path.stat().st_size if path.is_file() else None
        if size != info.bytes:
            return f"{path.name} has {size} bytes, the index says {info.bytes}"
        if check_hash and info.hashes:
            algorithm, expected = next(iter(sorted(info.hashes.items())))
            if get_hash(algorithm, path.read_bytes()) != expected:
                return f"{path.name} fails its {algorithm} check"
        return None


def upload_prepared(local_dir: str | Path, remote: str) -> list[str]:
    """Copy a finished `prepare_data` folder to `remote` with streaming's uploaders; returns the files sent.

    The manifest goes last, so a reader that finds it also finds every shard. Files already at the remote
    are overwritten.
    """
    root = Path(local_dir)
    if not (root / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {root}: upload a folder written by scripts/prepare_data.py")
    if not urllib.parse.urlparse(remote).scheme and Path(remote).resolve() == root.resolve():
        raise ValueError(f"the remote {remote} is the local folder itself")
    folders: dict[Path, list[str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if relative != Path(MANIFEST_NAME):
            folders.setdefault(relative.parent, []).append(relative.name)
    folders.setdefault(Path("."), []).append(MANIFEST_NAME)  # last
    sent: list[str] = []
    # One uploader per folder: streaming's uploaders create the remote folder of their own `out` only.
    streaming_log = logging.getLogger("streaming.base.storage.upload")
    previous = streaming_log.level
    streaming_log.setLevel(logging.ERROR)  # "exists and not empty": the local side is meant to be full
    try:
        for folder, names in sorted(folders.items(), key=lambda item: item[0] == Path(".")):
            remote_folder = remote if folder == Path(".") else join_remote(remote, folder.as_posix())
            uploader = CloudUploader.get(out=(str(root / folder), remote_folder), keep_local=True, exist_ok=True)
            for name in names:
                uploader.upload_file(name)
                sent.append(join_remote(remote_folder, name))
    finally:
        streaming_log.setLevel(previous)
    return sent
