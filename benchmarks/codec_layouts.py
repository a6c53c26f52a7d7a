"""In which order codec v2 should code a position's candidate ids and their probabilities (issue 26), measured.

    python -m benchmarks.codec_layouts     # needs store_bench's cached real-teacher data (make bench-store)

A position's top-k is a set of ids with a probability each. Sorted by id rank (v2: the rank under the shard's
context model, docs/FORMAT.md §4.6), the ids delta-code well and the values come in an order that says little about
them; sorted by probability, the values are a non-increasing sequence (its steps cost little) but the ids come in an
order that costs about log2(k!) bits more. This measures both and hybrids (the J most probable in probability order,
the rest in rank order), each column compressed whole with zstd level 9 (the codec's entropy coder; Arrow compresses
per record batch, within ~1 % of this), on positions the context model was learned from (in-sample) and on the
rest (held-out), beside ranks without contexts (v1's order). Bytes per target position, ids and values only
(tail, tokens, metadata and the model are the same in every layout: store_bench reports them).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pyarrow as pa

from benchmarks.common import write_json
from benchmarks.store_bench import FULL_SEQS, VOCAB_REAL, teacher_data
from logit_store.codecs import CONTEXT_MAX_SAMPLE, DEFAULT_LEVELS_V2, ContextModel, quantize_logprobs

K = 64
HEADS = (0, 4, 16, K)  # J: how many of the most probable come first, in probability order


def _zstd(a: np.ndarray) -> int:
    return pa.Codec("zstd", compression_level=9).compress(np.ascontiguousarray(a).tobytes()).size


def _rank_bytes(ranks: np.ndarray) -> int:
    """Ranks (or rank deltas) < 2^16 as v2 stores them: a low-byte and a high-byte column."""
    return _zstd((ranks & 255).astype(np.uint8)) + _zstd((ranks >> 8).astype(np.uint8))


def layout_bytes(ranks: np.ndarray, levels: np.ndarray, head: int) -> tuple[float, float]:
    """(ids, values) bytes per position: the `head` most probable candidates in probability order (ranks as they
    are, values as steps down from the previous), the rest sorted by rank (deltas, values in that order).
    `ranks` and `levels` are [P, K], most probable first."""
    n = ranks.shape[0]
    steps = -np.diff(levels[:, :head].astype(np.int64), axis=1, prepend=int(levels.max()) if head else 0)
    rest, rest_levels = ranks[:, head:], levels[:, head:]
    order = np.argsort(rest, axis=1)
    deltas = np.diff(np.take_along_axis(rest, order, 1), axis=1, prepend=0)
    ids = (_rank_bytes(ranks[:, :head]) if head else 0) + (_rank_bytes(deltas) if head < K else 0)
    values = (_zstd(steps.astype(np.uint8)) if head else 0) + \
        (_zstd(np.take_along_axis(rest_levels, order, 1)) if head < K else 0)
    return ids / n, values / n


def run(n_seqs: int) -> dict:
    data = teacher_data(n_seqs, "model", allow_model_run=False)
    ids = data.top_ids[:, :, :K].reshape(-1, K).astype(np.int64)
    levels = quantize_logprobs(data.top_lp[:, :, :K].reshape(-1, K), DEFAULT_LEVELS_V2)
    contexts = data.input_ids[:, :-1].reshape(-1).astype(np.int64)  # target t predicts token t + 1
    learned = min(CONTEXT_MAX_SAMPLE, len(ids))
    model = ContextModel.learn(ids[:learned].ravel(), np.full(learned, K), contexts[:learned], VOCAB_REAL)
    with_ctx = model.ranks(ids.ravel(), np.repeat(model.klass[contexts], K)).reshape(-1, K)
    no_ctx = model.order.rank[ids]
    out = {"source": data.source, "k": K, "levels": DEFAULT_LEVELS_V2, "positions": len(ids),
           "model_learned_from": learned, "rows": []}
    for name, ranks in (("context ranks (v2)", with_ctx), ("id order only (v1's)", no_ctx)):
        for head in HEADS:
            row = {"ranks": name, "probability_order_first": head}
            for part, sl in (("in_sample", slice(0, learned)), ("held_out", slice(learned, None))):
                if sl.start >= len(ids):
                    continue
                i, v = layout_bytes(ranks[sl], levels[sl], head)
                row[part] = {"ids": i, "values": v, "total": i + v}
            out["rows"].append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="benchmarks/results/codec_layouts.json")
    args = p.parse_args(argv)
    result = run(FULL_SEQS)
    print(f"top-{K}, {result['levels']} levels, {result['positions']:,} positions of {result['source']}; "
          f"the context model learned from the first {result['model_learned_from']:,}")
    print(f"{'ranks':<22} {'J':>3} | {'in-sample ids':>13} {'values':>7} {'sum':>6} | "
          f"{'held-out ids':>12} {'values':>7} {'sum':>6}")
    for r in result["rows"]:
        cells = "".join(f" | {r[part]['ids']:>{w}.1f} {r[part]['values']:>7.1f} {r[part]['total']:>6.1f}"
                        for part, w in (("in_sample", 13), ("held_out", 12)) if part in r)
        print(f"{r['ranks']:<22} {r['probability_order_first']:>3}{cells}")
    write_json(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
