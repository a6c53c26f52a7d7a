"""One KD training step offline (targets streamed from a store) vs online (teacher forward in the loop), same
student, same loss, same batches, one run.

    python -m benchmarks.train_bench [--quick] [--json PATH]

Teacher: SmolLM2-135M-Instruct (`make teacher`), else the tiny synthetic teacher. Student: the teacher pruned to
--keep-layers, converted to MoE-LoRA (8 experts, top-2, rank 16). Online = teacher forward (no grad) + top-k +
tail extraction + the student's step; offline = reading the batch from the store + the student's step.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from assets.corpora import bible_chapters
from benchmarks.common import teacher_dir, write_json
from logit_store import KDStream, Manifest, ShardWriter, StoreRow, TargetSpec
from logit_store.teachers.hf import HFTeacher
from student.baselines import count_parameters
from student.config import MoELoRAConfig
from student.convert import build_student
from student.losses import DistillLossConfig
from student.train import DistillStep


def _non_embedding(model) -> int:
    emb = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer, shorter steps")
    p.add_argument("--keep-layers", default="::10", help="student = these teacher layers (default ::10)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seq_len = 3, 128
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    folder, name = teacher_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    teacher = HFTeacher.from_pretrained(folder, dtype="float32")
    text = " ".join(d["text"] for d in bible_chapters()[:40])
    ids = np.asarray(tok(text).input_ids, dtype=np.int64)
    n_rows = args.batch_size * (args.steps + 1)
    rows = [ids[i * args.seq_len:(i + 1) * args.seq_len] for i in range(n_rows)]
    mask = np.ones(args.seq_len, bool)
    mask[0] = False

    store = tempfile.mkdtemp(prefix="train-bench-")
    manifest = Manifest(target=TargetSpec("topk", k=args.k), vocab_size=teacher.vocab_size)
    with ShardWriter(store, manifest, batch_tokens=args.seq_len * args.batch_size) as w:
        for i, (r, t) in enumerate(zip(rows, teacher.topk([(r, mask) for r in rows], args.k), strict=True)):
            w.write(StoreRow(r, mask, t, i))

    shape = MoELoRAConfig(experts=8, experts_per_token=2, rank=16, keep_layers=args.keep_layers)
    student = build_student(folder, shape)
    step = DistillStep(student, DistillLossConfig(kind="fkl"))
    opt = torch.optim.AdamW([q for q in student.parameters() if q.requires_grad], lr=1e-4)
    t_params, s_params = count_parameters(teacher.model).total, count_parameters(student).total
    t_ne, s_ne = _non_embedding(teacher.model), _non_embedding(student)

    def train_step(batch) -> None:
        loss, m = step(batch)
        (loss + m["aux"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def online_batches():
        stream = KDStream(store, args.batch_size, shuffle=False)
        for b in stream:  # the same input rows, targets recomputed by the teacher in the loop
            rows_b = [(x.numpy(), np.r_[False, np.ones(x.numel() - 1, bool)]) for x in b["input_ids"]]
            targets = teacher.topk(rows_b, args.k)
            pos = b["loss_mask"]
            tid = torch.zeros_like(b["target_ids"])
            tlp = torch.zeros_like(b["target_logprobs"])
            tail = torch.zeros_like(b["target_tail"])
            for i, t in enumerate(targets):
                tid[i, pos[i]] = torch.from_numpy(t.ids)
                tlp[i, pos[i]] = torch.from_numpy(t.logprobs)
                tail[i, pos[i]] = torch.from_numpy(t.tail).float()
            yield dict(b, target_ids=tid, target_logprobs=tlp, target_tail=tail)

    results = {}
    for mode, make in (("offline", lambda: iter(KDStream(store, args.batch_size, shuffle=False))),
                       ("online", online_batches)):
        it = make()
        train_step(next(it))  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(next(it))
        results[mode] = (time.perf_counter() - start) / args.steps
    tokens = args.batch_size * args.seq_len
    record = dict(teacher=name, teacher_params=t_params, student_params=s_params,
                  teacher_non_embedding=t_ne, student_non_embedding=s_ne, keep_layers=args.keep_layers,
                  batch=args.batch_size, seq_len=args.seq_len, k=args.k, threads=args.threads,
                  offline_step_s=round(results["offline"], 4), online_step_s=round(results["online"], 4),
                  offline_tokens_per_s=round(tokens / results["offline"]),
                  online_tokens_per_s=round(tokens / results["online"]),
                  speedup=round(results["online"] / results["offline"], 2))
    print(f"\nteacher {name}: {t_params / 1e6:.1f}M params ({t_ne / 1e6:.1f}M non-embedding); student "
          f"(layers {args.keep_layers}, MoE-LoRA 8x top-2 r16): {s_params / 1e6:.1f}M ({s_ne / 1e6:.1f}M "
          f"non-embedding); ratio {t_params / s_params:.1f}x ({t_ne / s_ne:.1f}x non-embedding)")
    print(f"batch {args.batch_size} x {args.seq_len} tokens, top-{args.k}, {args.threads} threads, CPU")
    print(f"{'mode':8s} {'s/step':>8s} {'tokens/s':>9s}")
    for mode in ("offline", "online"):
        print(f"{mode:8s} {results[mode]:8.3f} {tokens / results[mode]:9,.0f}")
    print(f"offline is {record['speedup']:.2f}x faster per step")
    if args.json:
        write_json(args.json, [record])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
