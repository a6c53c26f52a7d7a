"""Logits as the model serves them: what `model(...).logits` gives, post-processing included (Granite divides by
`logits_scaling`, Gemma-2 softcaps), is what the hf backend stores and what the student's loss, eval and the HF path
score; a post-processing moekd does not know is refused by name. Tiny random-init models of the real classes."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from logit_store import LogitStore
from logit_store.build import BuildConfig, build
from logit_store.model_logits import LogitTransform, LogitTransformError, check_served_logits, logit_transform
from logit_store.teachers import TeacherError
from logit_store.teachers.hf import HFTeacher
from student.losses import DistillLossConfig, dense_distill_loss, distill_loss

VOCAB = 320
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
             num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
             pad_token_id=0)


def _widen(model: torch.nn.Module) -> torch.nn.Module:
    """Random init of tiny models is near-uniform; widen it so the post-processing changes the distribution."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.08)
    return model.eval()


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    if family == "granite":  # logits / 8
        return _widen(tf.GraniteForCausalLM(tf.GraniteConfig(**SHAPE, logits_scaling=8.0)))
    if family == "gemma2":  # 3 tanh(logits / 3): a low cap, so that it bites on a tiny model's logits
        return _widen(tf.Gemma2ForCausalLM(tf.Gemma2Config(**SHAPE, head_dim=32, final_logit_softcapping=3.0)))
    if family == "cohere":  # logits x 0.25
        return _widen(tf.CohereForCausalLM(tf.CohereConfig(**SHAPE, logit_scale=0.25)))
    if family == "llama":  # the control: no post-processing
        return _widen(tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPE, tie_word_embeddings=False)))
    raise ValueError(family)


@pytest.fixture(scope="module")
def tokenizer():
    from student_fixtures import tiny_tokenizer

    return tiny_tokenizer()


def _rows(n: int = 3, length: int = 24, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ids = rng.integers(1, VOCAB, length - 3 * i)
        mask = np.ones(ids.size, bool)
        mask[0] = False  # nothing predicts the first token
        rows.append((ids, mask))
    return rows


@torch.no_grad()
def _served_logprobs(model, ids) -> torch.Tensor:
    """log_softmax of what the model itself returns: [T, V], float64."""
    return model(input_ids=torch.as_tensor(ids)[None]).logits[0].double().log_softmax(-1)


# ---------------------------------------------------------------- which transform, and the probe
@pytest.mark.parametrize("family, scale, softcap", [("granite", 0.125, None), ("gemma2", 1.0, 3.0),
                                                    ("cohere", 0.25, None), ("llama", 1.0, None)])
def test_each_family_gets_its_own_transform_and_the_probe_agrees(family, scale, softcap):
    model = tiny(family)
    t = check_served_logits(model)
    assert (t.scale, t.softcap) == (scale, softcap) and t == logit_transform(model.config)
    assert t.identity == (family == "llama")


def test_a_post_processing_moekd_does_not_know_is_refused_by_name():
    from transformers import LlamaForCausalLM

    class DoubledLlama(LlamaForCausalLM):  # post-processes its logits; config and table say "llama": no transform
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    model = DoubledLlama(tiny("llama").config)
    with pytest.raises(LogitTransformError, match=r"DoubledLlama \(llama\) post-processes its logits"):
        check_served_logits(model)
    with pytest.raises(TeacherError, match="hf backend: DoubledLlama"):
        HFTeacher(model)
    # a family the table does not know that sets a post-processing attribute: refused from the config alone
    config = tiny("llama").config
    config.logits_scaling = 4.0
    with pytest.raises(LogitTransformError, match="logits_scaling=4.0"):
        logit_transform(config)


def test_an_unknown_post_processing_attribute_is_refused_before_the_weights_load(tmp_path, tokenizer):
    from student.convert import load_base
    from student.moe_lora import UnsupportedModelError

    model = tiny("llama")
    model.config.lm_head_multiplier = 3.0  # a FalconH1 attribute on a Llama: its meaning there is unknown
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="lm_head_multiplier=3.0"):  # as a student's base
        load_base(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(TeacherError, match="hf backend: .*lm_head_multiplier=3.0"):  # not "cannot load"
        HFTeacher.from_pretrained(str(tmp_path), device="cpu")


# ---------------------------------------------------------------- the chunked head with a transform
@pytest.mark.parametrize("transform", [LogitTransform(scale=0.125), LogitTransform(softcap=1.5),
                                       LogitTransform(scale=2.0, softcap=2.5)], ids=["scale", "softcap", "both"])
@pytest.mark.parametrize("kind, temperature, keep", [("fkl", 1.0, False), ("srkl", 2.0, True), ("jsd", 0.7, False)])
def test_chunked_head_with_a_transform_equals_the_dense_reference(transform, kind, temperature, keep):
    from test_losses import loss_and_grads, make_batch, make_student

    batch = make_batch(seed=3)
    h, w, b = make_student(scale=2.0)
    cfg = DistillLossConfig(kind=kind, temperature=temperature, ce_weight=0.3, chunk_size=4, keep_logits=keep)

    def chunked(*a):
        return distill_loss(*a, transform)

    def dense(*a):
        return dense_distill_loss(*a, transform)

    lc, mc, gc = loss_and_grads(chunked, h, w, b, batch, cfg)
    ld, md, gd = loss_and_grads(dense, h, w, b, batch, cfg)
    assert abs(lc.item() - ld.item()) <= 1e-10 * max(1.0, abs(ld.item()))
    for x, y in zip(gc, gd, strict=True):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-11)
    assert mc["ce"].item() == pytest.approx(md["ce"].item(), rel=1e-10)
    # ... and the transform matters: without it, another loss
    assert abs(loss_and_grads(distill_loss, h, w, b, batch, cfg)[0].item() - lc.item()) > 1e-3


# ---------------------------------------------------------------- teacher side: the hf backend stores it
@pytest.mark.parametrize("family", ["granite", "gemma2", "llama"])
def test_hf_backend_targets_are_the_models_own_distribution(family):
    model = tiny(family)
    teacher, rows, k = HFTeacher(model, chunk_positions=7, batch_tokens=40), _rows(), 6
    for (ids, mask), t in zip(rows, teacher.topk(rows, k), strict=True):
        ref = _served_logprobs(model, ids)[np.flatnonzero(mask) - 1]
        lp, top = ref.topk(k, dim=-1)
        assert (np.sort(t.ids, 1) == np.sort(top.numpy(), 1)).all()
        assert np.abs(np.sort(t.logprobs, 1) - np.sort(lp.numpy(), 1)).max() < 1e-5
        tail = ref.scatter(-1, top, -math.inf).logsumexp(-1).numpy()
        assert np.abs(np.exp(t.tail) - np.exp(tail)).max() < 1e-6
    # sampled targets draw from the same distribution: a tail id's frequency over many draws follows it
    ids, mask = rows[0]
    draws = teacher.sample([(ids, mask)], 4000, seeds=[1], from_top_k=None)[0]
    ref = _served_logprobs(model, ids)[np.flatnonzero(mask)[0] - 1].exp().numpy()
    first = draws.sizes[0]
    freq = np.zeros(VOCAB)
    freq[draws.ids[:first]] = draws.counts[:first] / 4000
    assert np.abs(freq - ref).max() < 0.03


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tokenizer) -> dict:
    """Per family: (model, folder, store built by `kdstore build --backend hf`)."""
    out = {}
    tmp = tmp_path_factory.mktemp("served")
    data = tmp / "text.jsonl"
    from assets.synthetic import synthetic_corpus

    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_corpus(6, seed=3)))
    for family in ("granite", "gemma2"):
        model, folder = tiny(family), tmp / family
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build(BuildConfig(teacher=str(folder), data=str(data), out=str(tmp / f"{family}.store"),
                              text_field="text", backend="hf", top_k=8, max_seq_len=40, progress=False,
                              dtype="float32"))
        out[family] = (model, folder, LogitStore.open(str(tmp / f"{family}.store")))
    return out


@pytest.mark.parametrize("family", ["granite", "gemma2"])
def test_the_store_holds_the_models_distribution_within_the_codec(stores, family):
    """Stored top-8 sets and probabilities, and the tail mass, against softmax(model(...).logits); the codec keeps
    sqrt(p) in 255 steps, so a probability is within ~2/255 of the exact one."""
    model, _, store = stores[family]
    worst_p = worst_tail = 0.0
    positions = 0
    for row in store:
        ref = _served_logprobs(model, row.input_ids)[row.positions - 1]
        lp, top = ref.topk(8, dim=-1)
        assert (np.sort(row.target_ids, 1) == np.sort(top.numpy(), 1)).all()
        order = np.argsort(row.target_ids, 1)
        stored = np.exp(np.take_along_axis(row.target_logprobs, order, 1))
        exact = np.exp(np.take_along_axis(lp.numpy(), np.argsort(top.numpy(), 1), 1))
        worst_p = max(worst_p, float(np.abs(stored - exact).max()))
        tail = ref.scatter(-1, top, -math.inf).logsumexp(-1).exp().numpy()
        worst_tail = max(worst_tail, float(np.abs(np.exp(row.target_tail) - tail).max()))
        positions += len(row.positions)
    assert positions > 100
    assert worst_p < 0.01 and worst_tail < 0.01, (worst_p, worst_tail)


# ---------------------------------------------------------------- student side: scored as it serves
def _own_batch(model, rows, k: int = 5) -> dict:
    """A KDBatch whose targets are the model's own exact top-k (+ tail) of what it serves."""
    from logit_store.reader import DecodedRow
    from logit_store.stream import collate

    decoded = []
    for i, (ids, mask) in enumerate(rows):
        pos = np.flatnonzero(mask)
        ref = _served_logprobs(model, ids)[pos - 1]
        lp, top = ref.topk(k, dim=-1)
        tail = ref.scatter(-1, top, -math.inf).logsumexp(-1)
        decoded.append(DecodedRow(i, ids.astype(np.int64), mask, top.numpy(), lp.float().numpy(),
                                  np.ones(top.shape, bool), tail.float().numpy()))
    return dict(collate(decoded))


@pytest.mark.parametrize("family", ["granite", "gemma2"])
def test_a_student_scored_against_its_own_distribution_gets_zero_kd(family):
    """Through every caller of the chunked loss: kdstudent train's DistillStep and the HF path's sparse_kd_loss
    (the review measured KD 2.51 nats/token for Granite before)."""
    from student.hf_trainer import sparse_kd_loss, unshift_labels
    from student.train import DistillStep

    model = tiny(family)
    batch = _own_batch(model, _rows())
    cfg = DistillLossConfig(kind="fkl", ce_weight=1.0, chunk_size=16)
    with torch.no_grad():
        _, m = DistillStep(model, cfg)(batch)
        assert float(m["kd"]) < 1e-4  # a mean over the loss tokens
        _, m2 = sparse_kd_loss(model, dict(batch, labels=unshift_labels(batch["labels"])), cfg)
        assert float(m2["kd"]) / float(m2["tokens"]) < 1e-4
        # its CE is the model's own: the mean next-token NLL of model(...).logits
        nll = [-_served_logprobs(model, ids)[np.flatnonzero(mask) - 1, ids[mask]] for ids, mask in _rows()]
        ce = float(torch.cat(nll).mean())
        assert float(m2["ce"]) / float(m2["ce_tokens"]) == pytest.approx(ce, abs=1e-4)


@pytest.mark.parametrize("family", ["granite", "gemma2"])
def test_eval_scores_the_model_as_it_serves(stores, family):
    """kdstudent eval of the teacher itself against its own store: KD at the codec's level, and the CE and
    calibration (ECE) of the probabilities softmax(model(...).logits)."""
    from student.evaluate import ECE_BINS, evaluate

    model, _, store = stores[family]
    r = evaluate(model, store, batch_size=4)
    logp = [_served_logprobs(model, row.input_ids)[row.positions - 1] for row in store]
    labels = torch.cat([torch.as_tensor(row.input_ids[row.positions]) for row in store])
    logp = torch.cat(logp)
    assert r["ce"] == pytest.approx(float(-logp.gather(1, labels[:, None]).mean()), abs=1e-4)
    conf, pred = logp.exp().max(-1)
    bins = (conf * ECE_BINS).long().clamp(max=ECE_BINS - 1)
    gap = torch.zeros(ECE_BINS, dtype=torch.float64).index_add_(0, bins, conf - (pred == labels).double())
    assert r["ece"] == pytest.approx(float(gap.abs().sum() / len(labels)), abs=1e-4)
    assert r["teacher_kl"] < 2e-3


@pytest.mark.slow
@pytest.mark.parametrize("family", ["granite", "gemma2"])
def test_vllm_serves_the_same_distribution(tmp_path, tokenizer, family):
    """vLLM applies the family's post-processing itself (its LogitsProcessor's scale and soft_cap): its top-k
    equals log_softmax(model(...).logits) too (slow: a vLLM engine takes ~25 s to start on a CPU here)."""
    from logit_store.build import _teacher_options
    from logit_store.teachers import load_teacher

    model = tiny(family)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg = BuildConfig(teacher=str(tmp_path), data="d", out="o", backend="vllm", top_k=8, max_seq_len=48)
    teacher = load_teacher("vllm", str(tmp_path), **_teacher_options(cfg))
    rows = _rows()
    for (ids, mask), t in zip(rows, teacher.topk(rows, 8), strict=True):
        ref = _served_logprobs(model, ids)[np.flatnonzero(mask) - 1]
        lp, top = ref.topk(8, dim=-1)
        assert (np.sort(t.ids, 1) == np.sort(top.numpy(), 1)).all()
        assert np.abs(np.sort(t.logprobs, 1) - np.sort(lp.numpy(), 1)).max() < 1e-4


def test_vllm_generic_backend_is_refused_where_it_would_post_process_otherwise():
    """vLLM's Transformers fallback applies only logit_scale and final_logit_softcapping: a teacher served that
    way whose model does something else (Granite's logits_scaling) is refused; its own vLLM classes pass."""
    from transformers import Gemma2Config, GraniteConfig, LlamaConfig

    from logit_store.teachers import TeacherError
    from logit_store.teachers.vllm import check_fallback_logits

    check_fallback_logits(LlamaConfig(), "TransformersForCausalLM")
    check_fallback_logits(Gemma2Config(final_logit_softcapping=30.0), "TransformersForCausalLM")
    check_fallback_logits(GraniteConfig(logits_scaling=8.0), "GraniteForCausalLM")
    with pytest.raises(TeacherError, match="generic Transformers backend .* Use --backend hf"):
        check_fallback_logits(GraniteConfig(logits_scaling=8.0), "TransformersForCausalLM")
