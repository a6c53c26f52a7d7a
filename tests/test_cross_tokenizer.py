"""Cross-tokenizer distillation (student/cross_tokenizer.py): byte-exact text recovery, alignment of two
tokenizations at shared byte boundaries (checked against a brute-force alignment), the vocabulary map and its cache,
the gold/uld losses, bits per byte, and a store of one tokenizer teaching a student of another end to end."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from ct_fixtures import byte_level, sentencepiece_bpe, unigram

from logit_store.fingerprint import special_tokens_added
from student.cross_tokenizer import (
    StudentRows,
    align,
    compute_vocab_map,
    prefix_space,
    token_bytes,
    utf8_pieces,
    vocab_map,
)

TEXTS = ["The year 2024 had 365 days; 3.14159 is pi.",
         "naïve café — 日本語 テキスト 🙂 emoji",
         "  leading spaces\tand tabs\n\nnew lines 1,000,000.50",
         "Hello world, hello World! HELLO. Digits 0123456789"]


@pytest.fixture(scope="module")
def tokenizers():
    return {"byte-level": byte_level(), "sentencepiece": sentencepiece_bpe(), "unigram": unigram()}


def _teacher_row(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts encoded as the build does (the tokenizer's own specials), joined by EOS: a packed row."""
    ids: list[int] = []
    for text in texts:
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
    ids = np.array(ids, np.int64)
    return ids, np.arange(len(ids)) > 0


def _render(tok, ids, table, before: list[int], mapped_to: dict[int, int], prefix: int, has_before: bool,
            student: bool) -> list[bytes]:
    """What each token adds to the text both models see: its bytes (the student's dummy prefix stripped at the start
    of each run), a marker for a special token the other side has too, nothing for one it lacks."""
    out, at_run_start = [], True
    lead = len(before) if before and [int(i) for i in ids[:len(before)]] == before else 0
    for k, i in enumerate(int(i) for i in ids):
        if k < lead:
            out.append(b"\xff<B>" if k == 0 and has_before else b"")
            at_run_start = True
        elif table[i] is None:
            j = i if student else mapped_to.get(i, -1)
            out.append(b"\xff<%d>" % j if j >= 0 else b"")
            at_run_start = True
        else:
            b = table[i]
            out.append(b[prefix:] if at_run_start and student else b)
            at_run_start = False
    return out


def brute_force(teacher, student, ids, loss, s_ids, s_loss) -> np.ndarray:
    """For each student token j: the teacher token i whose prefix renders the same text, both starting something."""
    t_table, s_table = token_bytes(teacher), token_bytes(student)
    vmap = compute_vocab_map(teacher, student)
    mapped = {i: int(vmap[i]) for i in range(len(vmap)) if vmap[i] >= 0}
    s_before = special_tokens_added(student)["before"]
    t_before = special_tokens_added(teacher)["before"]
    has_before = bool(t_before) and [int(i) for i in ids[:len(t_before)]] == t_before and bool(s_before)
    tr = _render(teacher, ids, t_table, t_before, mapped, 0, has_before, False)
    sr = _render(student, s_ids, s_table, s_before if has_before else [], mapped, prefix_space(student, s_table),
                 has_before, True)
    out = np.full(len(s_ids), -1)
    for j, i in itertools.product(range(1, len(s_ids)), range(1, len(ids))):
        if s_loss[j] and loss[i] and sr[j] and tr[i] and b"".join(sr[:j]) == b"".join(tr[:i]):
            assert out[j] == -1, "two teacher tokens at one student boundary"
            out[j] = i
    return out


@pytest.mark.parametrize("pair", [("byte-level", "sentencepiece"), ("sentencepiece", "byte-level"),
                                  ("byte-level", "unigram"), ("unigram", "sentencepiece"),
                                  ("sentencepiece", "unigram")])
def test_alignment_equals_brute_force(tokenizers, pair):
    teacher, student = tokenizers[pair[0]], tokenizers[pair[1]]
    rows = StudentRows(teacher, student)
    # a Unigram with a dummy prefix collapses runs of whitespace: those runs are not spelled back, never aligned
    cases = [[TEXTS[0]], TEXTS[:2], [TEXTS[1], TEXTS[3]]] if pair[1] == "unigram" else \
        [[TEXTS[0]], TEXTS[:2], [TEXTS[2], TEXTS[3]], TEXTS]
    for texts in cases:
        ids, loss = _teacher_row(teacher, texts)
        loss[: len(ids) // 3] = False  # a prompt without loss
        (t, s), = rows.convert([(ids, loss)])
        assert b"".join(b for b in (token_bytes(teacher)[int(i)] for i in ids) if b) == \
            "".join(texts).encode() or pair[0] == "unigram"  # text recovered exactly (unigram adds its prefix)
        got = align(t, s)
        want = brute_force(teacher, student, ids, loss, s.ids, s.loss)
        assert (got == want).all(), (texts, np.flatnonzero(got != want))
        assert (got >= 0).sum() > 0.3 * min(s.loss.sum(), loss.sum())  # most boundaries are shared on plain text


def test_the_student_tokenizes_the_text_as_at_inference(tokenizers):
    teacher, student = tokenizers["sentencepiece"], tokenizers["byte-level"]
    ids, loss = _teacher_row(teacher, [TEXTS[1]])
    (_, s), = StudentRows(teacher, student).convert([(ids, loss)])
    # the teacher's BOS has no counterpart (the student adds none), its EOS becomes the student's
    assert s.ids.tolist() == student(TEXTS[1], add_special_tokens=False)["input_ids"] + [student.eos_token_id]


def test_same_tokenizer_aligns_everything(tokenizers):
    tok = tokenizers["sentencepiece"]
    ids, loss = _teacher_row(tok, TEXTS)
    (t, s), = StudentRows(tok, tok).convert([(ids, loss)])
    assert s.ids.tolist() == ids.tolist()
    assert (align(t, s)[1:] == np.arange(1, len(ids))).all()
    table = compute_vocab_map(tok, tok)
    assert (table[: len(tok)] == np.arange(len(tok))).all()


def test_a_row_cut_mid_character(tokenizers):
    """A row that starts or ends inside a UTF-8 character: the stray bytes are no text; the rest aligns."""
    data = "日本語 ok".encode()[2:]
    assert utf8_pieces(data) == [(1, "本語 ok")]
    teacher, student = tokenizers["sentencepiece"], tokenizers["byte-level"]
    ids = np.array(teacher("日本語 テキスト ok", add_special_tokens=False)["input_ids"][1:], np.int64)
    (t, s), = StudentRows(teacher, student).convert([(ids, np.ones(len(ids), bool))])
    assert (align(t, s) >= 0).any()


def test_vocab_map_is_cached_by_both_fingerprints(tokenizers, tmp_path):
    teacher, student = tokenizers["sentencepiece"], tokenizers["byte-level"]
    first = vocab_map(teacher, student, str(tmp_path))
    (cached,) = list(tmp_path.iterdir())
    np.save(cached, np.full_like(first, 7))  # the second call reads the file, it does not recompute
    assert (vocab_map(teacher, student, str(tmp_path)) == 7).all()
    assert len(list(tmp_path.iterdir())) == 1
    vocab_map(student, teacher, str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2
    s_bytes, t_bytes = token_bytes(student), token_bytes(teacher)
    for i in np.flatnonzero(first >= 0):
        if t_bytes[i] is not None:
            assert s_bytes[first[i]] == t_bytes[i]
    matched = first[first >= 0]
    assert len(set(matched.tolist())) == len(matched)  # one teacher id per student id


# ================================================================ end to end: kdstore build -> train -> eval
def _student_dir(path, tokenizer, seed: int = 0) -> str:
    """A tiny random Llama speaking `tokenizer` (its vocabulary), saved with it."""
    import torch

    from assets.synthetic import tiny_llama

    model = tiny_llama(len(tokenizer), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.08)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def cross_store(tiny_teacher_dir, tmp_path_factory):
    """A store built by `kdstore build` with the tiny teacher (byte-level BPE), on text with digits and unicode."""
    import json

    from assets.synthetic import synthetic_corpus
    from cli import kdstore

    tmp = tmp_path_factory.mktemp("cross")
    texts = synthetic_corpus(24, seed=5) + TEXTS
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = str(tmp / "store")
    assert kdstore.main(["build", "--teacher", tiny_teacher_dir, "--data", str(data), "--text-field", "text",
                         "--out", out, "--backend", "hf", "--top-k", "8", "--max-seq-len", "48",
                         "--no-progress"]) == 0
    return out


def test_the_store_carries_its_tokenizer(cross_store, tiny_teacher_dir, tmp_path):
    import shutil

    from logit_store import LogitStore
    from logit_store.store_tokenizer import load_tokenizer

    store = LogitStore.open(cross_store)
    assert store.manifest.tokenizer["files"] == "tokenizer"
    assert store.verify() == []
    tok = load_tokenizer(store)  # from the store's copy, checked against the recorded fingerprint
    assert tok.get_vocab() == __import__("transformers").AutoTokenizer.from_pretrained(tiny_teacher_dir).get_vocab()
    # a store written before stores carried their tokenizer: the tokenizer it names, if it loads and matches
    old = tmp_path / "old"
    shutil.copytree(cross_store, old)
    shutil.rmtree(old / "tokenizer")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["tokenizer"]["files"]
    from logit_store.manifest import Manifest

    m = Manifest.from_dict(manifest)
    (old / "manifest.json").write_text(m.to_json())
    assert load_tokenizer(LogitStore.open(str(old))).get_vocab() == tok.get_vocab()
    m.tokenizer["name_or_path"] = str(tmp_path / "gone")
    (old / "manifest.json").write_text(m.to_json())
    with pytest.raises(ValueError, match="does not carry its tokenizer"):
        load_tokenizer(LogitStore.open(str(old)))


def test_a_store_of_one_tokenizer_trains_a_student_of_another(cross_store, tmp_path, capsys):
    from cli.kdstudent import main

    student = _student_dir(tmp_path / "student", sentencepiece_bpe())
    run = str(tmp_path / "run")
    common = ["train", "--store", cross_store, "--base", student, "--student", "lora", "--rank", "4",
              "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "0", "--lr", "1e-3", "--ce-weight", "0.5",
              "--no-progress", "--log-every", "1"]
    assert main([*common, "--out", run + "0"]) == 2  # refused without the flag, naming both tokenizers and it
    err = capsys.readouterr().err
    assert "--cross-tokenizer" in err and student in err and "fingerprint" in err
    assert main([*common, "--out", run, "--cross-tokenizer", "gold"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < last["aligned"] < 1 and np.isfinite(last["loss"]) and last["kd"] > 0
    assert main(["eval", "--model", run, "--store", cross_store, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["aligned"] < 1 and 0 < result["matched_mass"] <= 1 and result["bpb"] > 0
    assert result["bpb"] == pytest.approx(result["ce"] * result["tokens"] / np.log(2) / _text_bytes(cross_store,
                                                                                                      student))


def _text_bytes(store: str, student_dir: str) -> int:
    """The bytes of text the student's loss positions predict, counted independently: each row's text re-encoded by
    the student, minus what its first token spells (nothing predicts it)."""
    from transformers import AutoTokenizer

    from logit_store import LogitStore
    from logit_store.store_tokenizer import load_tokenizer

    s = LogitStore.open(store)
    teacher, student = load_tokenizer(s), AutoTokenizer.from_pretrained(student_dir)
    total = 0
    for row in s:
        (_, tok), = StudentRows(teacher, student).convert([(row.input_ids, row.loss_mask)])
        total += int(tok.nbytes[1:][tok.loss[1:]].sum())
    return total


# ================================================================ the loss and bits per byte
def _rows(teacher_dir: str, texts: list[str], k: int = 8):
    """DecodedRows of the tiny teacher's top-k on `texts`, encoded as the build encodes them."""
    from transformers import AutoTokenizer

    from logit_store.reader import DecodedRow
    from logit_store.teachers.hf import HFTeacher

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    rows = [(np.array(tok(t)["input_ids"] + [tok.eos_token_id], np.int64), None) for t in texts]
    rows = [(ids, np.arange(len(ids)) > 0) for ids, _ in rows]
    targets = HFTeacher.from_pretrained(teacher_dir).topk(rows, k)
    return tok, [DecodedRow(i, ids, mask, t.ids.astype(np.int64), t.logprobs.astype(np.float32),
                            np.ones(t.ids.shape, bool), t.tail.astype(np.float32))
                 for i, ((ids, mask), t) in enumerate(zip(rows, targets, strict=True))]


@pytest.mark.parametrize("kind", ["fkl", "srkl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gold_equals_the_ordinary_kd_loss_with_one_tokenizer(tiny_teacher_dir, kind, temperature):
    import torch

    from logit_store.stream import collate
    from student.cross_tokenizer import CrossTokenizerCollator
    from student.losses import DistillLossConfig, distill_loss

    tok, rows = _rows(tiny_teacher_dir, TEXTS[:1] + ["The cat sees a dog. A small bird finds the red house."])
    plain = collate(rows)
    cross = CrossTokenizerCollator(tok, tok)(rows)
    assert torch.equal(cross["input_ids"], plain["input_ids"]) and cross["aligned"].eq(plain["loss_mask"]).all()
    torch.manual_seed(0)
    hidden = torch.randn(*plain["input_ids"].shape, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(tok), 16, dtype=torch.float64, requires_grad=True)
    cfg = DistillLossConfig(kind=kind, ce_weight=0.3, temperature=temperature, chunk_size=5)
    want, wm = distill_loss(hidden, weight, plain, cfg)
    got, gm = distill_loss(hidden, weight, cross, DistillLossConfig(**{**cfg.__dict__, "cross_tokenizer": "gold"}))
    torch.testing.assert_close(got, want)
    assert float(gm["uld"]) == 0 and float(gm["aligned"]) == float(wm["tokens"])
    g_want = torch.autograd.grad(want, (hidden, weight))
    g_got = torch.autograd.grad(got, (hidden, weight))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)


def test_uld_and_gold_across_tokenizers_are_finite_and_chunk_free(tiny_teacher_dir):
    """Across tokenizers: both losses finite with finite gradients, the same for any chunk size (the LM head runs
    chunked), ULD zero when the student's sorted probabilities equal the teacher's."""
    import torch

    from student.cross_tokenizer import CrossTokenizerCollator
    from student.losses import DistillLossConfig, distill_loss

    tok, rows = _rows(tiny_teacher_dir, TEXTS)
    student = sentencepiece_bpe()
    batch = CrossTokenizerCollator(tok, student)(rows)
    assert batch["aligned"].any() and (batch["target_matched"] & ~batch["target_mask"]).sum() == 0
    torch.manual_seed(1)
    hidden = torch.randn(*batch["input_ids"].shape, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(student), 16, dtype=torch.float64, requires_grad=True)
    for mode in ("gold", "uld"):
        losses = []
        for chunk in (3, 1000):
            loss, m = distill_loss(hidden, weight, batch, DistillLossConfig(cross_tokenizer=mode, ce_weight=0.5,
                                                                            chunk_size=chunk))
            grads = torch.autograd.grad(loss, (hidden, weight))
            assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1])
        assert float(m["uld"]) > 0
    with pytest.raises(ValueError, match="cross-tokenizer batch"):
        distill_loss(hidden, weight, batch, DistillLossConfig())


def test_bits_per_byte_by_hand(tiny_teacher_dir, tmp_path):
    """bpb = the student's summed NLL of its predicted tokens, in bits, over the bytes those tokens spell: computed
    here from a plain forward of the tiny model and each token's decoded text."""
    import torch
    from store_fixtures import write_teacher_store
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logit_store import LogitStore
    from student.evaluate import evaluate

    store = write_teacher_store(str(tmp_path / "s"), tiny_teacher_dir, rows=3, seq=20)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    nll, nbytes = 0.0, 0
    with torch.no_grad():
        for row in LogitStore.open(store):
            logp = model(torch.as_tensor(row.input_ids)[None]).logits[0].double().log_softmax(-1)
            for j in row.positions:
                nll -= float(logp[j - 1, row.input_ids[j]])
                token = int(row.input_ids[j])
                if token not in tok.all_special_ids:
                    nbytes += len(tok.convert_tokens_to_string([tok.convert_ids_to_tokens(token)]).encode())
    result = evaluate(model, store, tokenizer=tok)
    assert result["bpb"] == pytest.approx(nll / np.log(2) / nbytes, rel=1e-5)
    assert "aligned" not in result  # the student's own tokenizer: no alignment to report
    assert "bpb" not in evaluate(model, store)  # without the student's tokenizer, no bytes


# ================================================================ mixing, two processes and resume, across tokenizers
def _cross_store(tiny_teacher_dir: str, out, texts: list[str]) -> str:
    """A `kdstore build` store of the tiny teacher with record batches of about 2 rows (the unit dealt to ranks)."""
    from cli import kdstore

    data = out.parent / f"{out.name}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert kdstore.main(["build", "--teacher", tiny_teacher_dir, "--data", str(data), "--text-field", "text",
                         "--out", str(out), "--backend", "hf", "--top-k", "8", "--max-seq-len", "40",
                         "--record-batch-tokens", "80", "--no-progress"]) == 0
    return str(out)


def _cross_train(stores: list[str], base: str, out, processes: int, *extra: str) -> None:
    """`kdstudent train --cross-tokenizer gold` on a mixture, in `processes` processes (torchrun for 2)."""
    import os
    import subprocess
    import sys

    launch = (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
              if processes > 1 else [])
    argv = [sys.executable, *launch, "-m", "cli.kdstudent", "train", "--store", stores[0], "--store",
            f"{stores[1]}:0.4", "--base", base, "--out", str(out), "--cross-tokenizer", "gold", "--ce-weight", "0.5",
            "--experts", "4", "--rank", "4", "--attn-rank", "4", "--balance-coef", "0", "--batch-size",
            str(4 // processes), "--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "5", "--lr", "3e-3",
            "--warmup-steps", "0", "--log-every", "1", "--seed", "2", "--no-progress", *extra]
    run = subprocess.run(argv, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]


def test_a_cross_tokenizer_mixture_in_two_processes_equals_one_and_resumes_exactly(tiny_teacher_dir, tmp_path):
    """Mixing, DDP and --resume with --cross-tokenizer: the student's own tokenization happens per rank in the
    DataLoader, so the KD loss's normaliser (aligned positions) must be the global one for 2 processes to equal 1."""
    from safetensors.torch import load_file
    from student_fixtures import as_if_killed_after

    from assets.synthetic import synthetic_corpus
    from student.run import read_metrics

    stores = [_cross_store(tiny_teacher_dir, tmp_path / "a", synthetic_corpus(16, seed=7) + TEXTS),
              _cross_store(tiny_teacher_dir, tmp_path / "b", synthetic_corpus(12, seed=8))]
    base = _student_dir(tmp_path / "student", sentencepiece_bpe())
    one, two = tmp_path / "one", tmp_path / "two"
    _cross_train(stores, base, one, 1)
    _cross_train(stores, base, two, 2)
    losses = {r: [(m["step"], m["loss"], m["aligned"]) for m in read_metrics(r) if "loss" in m] for r in (one, two)}
    assert [s for s, _, _ in losses[one]] == [s for s, _, _ in losses[two]] == list(range(1, 7))
    assert all(0 < a < 1 for _, _, a in losses[one])
    np.testing.assert_allclose([x for _, x, _ in losses[two]], [x for _, x, _ in losses[one]], rtol=1e-4)
    np.testing.assert_allclose([a for _, _, a in losses[two]], [a for _, _, a in losses[one]], rtol=1e-6)

    # killed after step 3 (newest checkpoint 2, mid-epoch), resumed in two processes: bit for bit
    crashed = as_if_killed_after(two, tmp_path / "crashed", 3)
    _cross_train(stores, base, crashed, 2, "--resume")
    assert [(m["step"], m["loss"]) for m in read_metrics(crashed) if "loss" in m] == \
        [(s, x) for s, x, _ in losses[two]]
    a, b = (load_file(str(r / "checkpoint-6" / "trainable.safetensors")) for r in (two, crashed))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_kd_trainer_distils_a_student_of_another_tokenizer(cross_store, tmp_path):
    """The transformers.Trainer path: StoreDataset + KDCollator(cross=...) + KDTrainer(kd_config with
    cross_tokenizer) computes the loss `kdstudent train` computes on the same batch, and the student learns."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from logit_store import LogitStore
    from student.cross_tokenizer import collator_for
    from student.hf_trainer import KDCollator, KDTrainer, StoreDataset, sparse_kd_loss
    from student.losses import DistillLossConfig, distill_loss

    base = _student_dir(tmp_path / "student", sentencepiece_bpe())
    tok = AutoTokenizer.from_pretrained(base)
    ds = StoreDataset(cross_store)
    cross = collator_for(LogitStore.open(cross_store), tok)
    collator = KDCollator(ds.domain_names, cross=cross)
    cfg = DistillLossConfig(cross_tokenizer="gold", ce_weight=0.5)
    model = AutoModelForCausalLM.from_pretrained(base)
    rows = [ds[i] for i in range(len(ds))]

    def store_loss() -> tuple[float, dict]:
        with torch.no_grad():
            loss, metrics = sparse_kd_loss(model, collator(rows), cfg)
        return loss.item(), metrics

    before, metrics = store_loss()
    # what `kdstudent train` computes: distill_loss on CrossTokenizerCollator's batch (no label round trip)
    batch = cross(rows, 0, ds.domain_names)
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states[-1]
        direct, direct_metrics = distill_loss(hidden, model.get_output_embeddings().weight, batch, cfg)
    assert before == pytest.approx(direct.item(), rel=1e-5)
    assert 0 < metrics["aligned"] < direct_metrics["tokens"]

    args = TrainingArguments(str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3,
                             report_to=[], remove_unused_columns=False, save_strategy="no", use_cpu=True,
                             logging_steps=1, seed=0)
    with pytest.raises(ValueError, match="not the one the store"):  # without cross_tokenizer: refused, as before
        KDTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, data_collator=collator)
    KDTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, data_collator=collator,
              kd_config=cfg).train()
    after = store_loss()[0]
    assert after < before - 0.1
