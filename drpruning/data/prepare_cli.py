"""The `prepare_data` command line (scripts/prepare_data.py): tokenize and pack per-domain text into MDS
train/eval splits (`prepare.py`), print what each domain holds, and with `--remote URL` upload the finished
folder there (`remote.py`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from drpruning.data.prepare import prepare_data
from drpruning.data.remote import upload_prepared
from drpruning.data.sources import parse_domain_arg
from drpruning.errors import ConfigError, report_error


def summary_lines(manifest: Mapping[str, Any]) -> list[str]:
    """Per domain: tokens in train / eval / dropped (and replaced lone surrogates), for the end of a run."""
    lines = []
    for domain in manifest["domains"]:
        line = (f"{domain['name']}: {domain['train']['tokens']:,} train / {domain['eval']['tokens']:,} eval / "
                f"{domain['dropped_tokens']:,} dropped tokens ({domain['train']['sequences']:,} + "
                f"{domain['eval']['sequences']:,} sequences of {manifest['seq_len']} tokens, {domain['files']} "
                f"file(s), {domain['documents']:,} document(s))")  # fmt: skip
        if domain.get("replaced_surrogates"):
            line += f"; replaced {domain['replaced_surrogates']:,} lone surrogate(s) with U+FFFD"
        lines.append(line)
        for entry in domain.get("skipped_inputs", []):
            lines.append(f"{domain['name']}: skipped {entry['path']} ({entry['why']})")
    return lines


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tokenize and pack per-domain text into MDS train/eval splits for the domain_mixture loader.",
    )
    parser.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer folder")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per packed sequence")
    parser.add_argument("--eval-sequences", type=int, required=True, help="held-out sequences per domain")
    parser.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    parser.add_argument(
        "--domain", action="append", required=True, metavar="NAME=PATH_OR_GLOB",
        help="a domain and its input (folder, file or glob; repeat a NAME to add inputs); order = domain order",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier prepare_data output in --out (only the files it wrote)")
    parser.add_argument("--batch-documents", type=int, default=256, help="documents per tokenizer call")
    parser.add_argument("--shard-size-limit", type=int, default=1 << 26, help="bytes per MDS shard")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bars")
    parser.add_argument("--remote", metavar="URL", help="after preparing, upload --out to this remote (s3://, "
                        "gs://, oci://, a shared folder, ... anything mosaicml-streaming writes to)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (scripts/prepare_data.py); returns the process exit code."""
    args = build_arg_parser().parse_args(argv)
    try:
        domains: dict[str, list[str]] = {}
        for arg in args.domain:
            name, pattern = parse_domain_arg(arg)
            domains.setdefault(name, []).append(pattern)
        manifest = prepare_data(
            domains, args.tokenizer, args.out, args.seq_len, args.eval_sequences,
            overwrite=args.overwrite, batch_documents=args.batch_documents,
            shard_size_limit=args.shard_size_limit, show_progress=not args.no_progress,
        )
    except ConfigError as e:
        return report_error(e, prog="prepare_data")
    for line in summary_lines(manifest):
        print(line)
    print(f"wrote {args.out}")
    if args.remote is None:
        return 0
    try:
        sent = upload_prepared(args.out, args.remote)
    except Exception as error:
        return report_error(f"upload to {args.remote} failed: {type(error).__name__}: {error}", prog="prepare_data")
    print(f"uploaded {args.out} to {args.remote} ({len(sent)} files)")
    return 0
