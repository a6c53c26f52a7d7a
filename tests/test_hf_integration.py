"""transformers.Trainer users: StoreDataset + KDCollator + sparse_kd_loss / KDTrainer (student/hf_trainer.py), and
the example in docs/HF_TRAINER.md, run as written there."""

import json
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from assets.synthetic import synthetic_corpus, tiny_llama
from logit_store import LogitStore, collate
from logit_store.build import BuildConfig, build
from student.hf_trainer import KDCollator, KDTrainer, StoreDataset, shift_labels, sparse_kd_loss, unshift_labels
from student.losses import DistillLossConfig, distill_loss

DOC = Path(__file__).parent.parent / "docs" / "HF_TRAINER.md"
FIXTURES = Path(__file__).parent / "fixtures"
PATHS_LINE = 'STORE, STUDENT, OUT, USE_PEFT = "teacher-store", "path/to/student", "kd-run", False'


@pytest.fixture(scope="module")
def store(tiny_teacher_dir, tmp_path_factory) -> str:
    """A top-16 store of 64 rows of unequal length, with two domains, from the tiny teacher (hf backend)."""
    tmp = tmp_path_factory.mktemp("hf_store")
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "src": "ab"[i % 2]}) + "\n"
                            for i, t in enumerate(synthetic_corpus(64, seed=4))))
    build(BuildConfig(teacher=tiny_teacher_dir, data=str(data), out=str(tmp / "store"), backend="hf",
                      text_field="text", domain_field="src", top_k=16, max_seq_len=64, progress=False))
    return str(tmp / "store")


@pytest.fixture(scope="module")
def student_dir(tiny_teacher_dir, tmp_path_factory) -> str:
    """A random tiny Llama with the teacher's tokenizer, saved as a plain transformers folder."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("student")
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    tiny_llama(len(tok), seed=1).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _doc_example() -> str:
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text[text.index("## Example"):], re.S)
    assert blocks and blocks[0].count(PATHS_LINE) == 1, "the example's paths line changed: update this test"
    return blocks[0]


def _run_doc_example(store: str, student: str, out: Path, peft: bool) -> dict:
    code = _doc_example().replace(PATHS_LINE, f"STORE, STUDENT, OUT, USE_PEFT = {store!r}, {student!r}, "
                                              f"{str(out)!r}, {peft}")
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - the documented example, as written
    return namespace


def _store_loss(model, store: str) -> float:
    """The KD loss of `model` on every row of the store, as the example's KDTrainer computes it."""
    ds = StoreDataset(store)
    with torch.no_grad():
        loss, _ = sparse_kd_loss(model, KDCollator(ds.domain_names)([ds[i] for i in range(len(ds))]),
                                 DistillLossConfig(kind="fkl", ce_weight=0.1))
    return loss.item()


def test_doc_example_trains_a_plain_model(store, student_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ns = _run_doc_example(store, student_dir, tmp_path / "run", peft=False)
    logged = [h["loss"] for h in ns["trainer"].state.log_history if "loss" in h]
    assert len(logged) == 10 and all(np.isfinite(logged))
    initial = AutoModelForCausalLM.from_pretrained(student_dir)
    assert _store_loss(ns["model"], store) < _store_loss(initial, store) - 0.2  # it learns
    before, after = initial.state_dict(), ns["model"].state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("proj.weight"))


def test_doc_example_with_peft_changes_only_the_adapters(store, student_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ns = _run_doc_example(store, student_dir, tmp_path / "run", peft=True)
    initial = AutoModelForCausalLM.from_pretrained(student_dir)
    assert _store_loss(ns["model"], store) < _store_loss(initial, store) - 0.01  # the adapters learn
    before = initial.state_dict()
    lora_b, same = [], []
    for name, p in ns["model"].named_parameters():
        if "lora_" in name:
            if "lora_B" in name:
                lora_b.append(bool(p.abs().sum() > 0))  # LoRA B starts at 0
            continue
        base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        same.append(torch.equal(p.detach(), before[base_name]))
    assert len(lora_b) == 7 * 2 and all(lora_b)  # every linear layer of the 2 blocks got an adapter, and it moved
    assert len(same) == len(before) and all(same)  # every base weight is as it was


def test_collator_labels_follow_transformers_and_the_rest_is_the_kd_batch(store, student_dir):
    from transformers import AutoModelForCausalLM

    ds = StoreDataset(store)
    rows = [ds[i] for i in (3, 10, 11, 40)]
    batch = KDCollator(ds.domain_names)(rows)
    kd = collate(rows, 0, ds.domain_names)
    for key in kd:
        assert torch.equal(batch[key], kd[key] if key != "labels" else unshift_labels(kd[key])), key
    assert torch.equal(shift_labels(batch["labels"]), kd["labels"])
    assert [ds.domain_names[d] for d in batch["domain"].tolist()] == [r.domain for r in rows]
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    with torch.no_grad():  # the model's own CE with these labels is distill_loss's CE on the same batch
        hf_ce = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        _, m = distill_loss(hidden, model.lm_head.weight, kd, DistillLossConfig(ce_weight=1.0))
    assert hf_ce.item() == pytest.approx(m["ce"].item(), rel=1e-5)


def test_sparse_kd_loss_builds_no_full_logits(store, student_dir):
    from transformers import AutoModelForCausalLM

    ds = StoreDataset(store)
    batch = KDCollator(ds.domain_names)([ds[i] for i in range(6)])
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    loss, metrics = sparse_kd_loss(model, batch, DistillLossConfig(kind="fkl", ce_weight=0.1))
    hook.remove()
    loss.backward()
    assert seen == [(6, 1, model.config.hidden_size)]  # the forward's LM head: one position per row
    assert model.lm_head.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is not None
    # the same loss as distill_loss on the body's hidden states (mean over the batch's loss tokens)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref, _ = distill_loss(hidden, model.lm_head.weight, dict(batch, labels=shift_labels(batch["labels"])),
                              DistillLossConfig(kind="fkl", ce_weight=0.1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert int(metrics["tokens"]) == int(batch["loss_mask"].sum())


def _one_sgd_step(store, student_dir, out, batch_size, accumulation) -> dict:
    from transformers import AutoModelForCausalLM, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    args = TrainingArguments(str(out), max_steps=1, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, learning_rate=1.0, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=0.0, remove_unused_columns=False,
                             report_to=[], save_strategy="no", seed=0, disable_tqdm=True)
    ds = StoreDataset(store)
    KDTrainer(model=model, args=args, train_dataset=ds, data_collator=KDCollator(ds.domain_names)).train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_gives_the_gradient_of_one_big_batch(store, student_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    lengths = {int(r.loss_mask.sum()) for r in LogitStore.open(store)}
    assert len(lengths) > 5  # rows of unequal length: a mean per micro-batch would weigh tokens unequally
    one = _one_sgd_step(store, student_dir, tmp_path / "a", batch_size=4, accumulation=1)
    two = _one_sgd_step(store, student_dir, tmp_path / "b", batch_size=2, accumulation=2)
    initial = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    assert all(not torch.equal(one[k], initial[k]) for k in initial if k.endswith("proj.weight"))  # it stepped
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6)


def test_evaluate_reports_the_kd_loss(store, student_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    ds = StoreDataset(store)
    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=64, remove_unused_columns=False,
                             report_to=[], disable_tqdm=True)
    trainer = KDTrainer(model=model, args=args, data_collator=KDCollator(ds.domain_names))
    result = trainer.evaluate(ds)
    with torch.no_grad():
        ref, _ = sparse_kd_loss(model, KDCollator(ds.domain_names)([ds[i] for i in range(len(ds))]))
    assert result["eval_loss"] == pytest.approx(ref.item(), rel=1e-5)


def test_store_dataset_reads_every_row_in_any_order(store, tmp_path):
    ds = StoreDataset(store, cache_units=1)
    reference = list(LogitStore.open(store))
    assert len(ds) == len(reference) == 64
    order = np.random.default_rng(0).permutation(len(ds))
    for i in order:
        a, b = ds[int(i)], reference[int(i)]
        assert (a.source_index, a.domain) == (b.source_index, b.domain)
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.target_ids, b.target_ids)
    with pytest.raises(IndexError, match="out of range"):
        ds[64]
    again = pickle.loads(pickle.dumps(ds))  # what DataLoader workers get
    assert np.array_equal(again[5].target_logprobs, reference[5].target_logprobs)


def test_kd_trainer_checks_the_model_against_its_stores_before_any_step(store, student_dir, tiny_teacher_dir,
                                                                        tmp_path):
    """A model whose vocabulary cannot score every stored id (before: an IndexError mid-step), or a Trainer whose
    tokenizer is not the stores', is refused when the trainer is made or asked to evaluate, naming the store."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from assets.synthetic import train_tokenizer

    args = TrainingArguments(str(tmp_path / "run"), max_steps=1, report_to=[], remove_unused_columns=False,
                             save_strategy="no")
    ds = StoreDataset(store)
    small = tiny_llama(LogitStore.open(store).manifest.vocab_size - 1, seed=1)
    with pytest.raises(ValueError, match="vocabulary .* is smaller than the store's"):
        KDTrainer(model=small, args=args, train_dataset=ds, data_collator=KDCollator(ds.domain_names))
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    other = train_tokenizer(synthetic_corpus(10, seed=1), vocab_size=300)
    with pytest.raises(ValueError, match="not the one the store"):
        KDTrainer(model=model, args=args, train_dataset=ds, processing_class=other,
                  data_collator=KDCollator(ds.domain_names))
    trainer = KDTrainer(model=small, args=args, processing_class=AutoTokenizer.from_pretrained(tiny_teacher_dir),
                        data_collator=KDCollator(ds.domain_names))
    with pytest.raises(ValueError, match="smaller than the store's"):
        trainer.evaluate(ds)


def test_store_dataset_refuses_another_tokenizer_and_warns_of_biased_samples(store, tmp_path):
    from assets.synthetic import train_tokenizer

    with pytest.raises(ValueError, match="not the one the store"):
        StoreDataset(store, tokenizer=train_tokenizer(synthetic_corpus(10, seed=1), vocab_size=300))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        StoreDataset(str(FIXTURES / "v1-sampled"))  # drawn from a top-8 + tail bucket by the earlier vLLM path
    assert any("biases the KD gradient" in str(w.message) for w in caught)


def test_kd_trainer_adds_a_moe_students_router_losses(store, tiny_teacher_dir, tmp_path):
    """A MoE-LoRA student under KDTrainer: the training loss is the KD loss plus its router losses (balance and z,
    padding excluded), divided over the accumulated micro-batches; evaluation reports the KD loss alone."""
    from transformers import TrainingArguments

    from student.config import TrainConfig
    from student.router_loss import count_only, router_losses
    from student.train import build_model

    cfg = TrainConfig(store=store, base=tiny_teacher_dir, out=str(tmp_path), keep_layers="0", experts=4, rank=4,
                      attn_rank=4, balance_coef=0.1, z_coef=0.01)
    model = build_model(cfg)
    ds = StoreDataset(store)
    batch = KDCollator(ds.domain_names)([ds[i] for i in range(6)])
    for accumulation in (1, 3):
        args = TrainingArguments(str(tmp_path / f"ga{accumulation}"), gradient_accumulation_steps=accumulation,
                                 remove_unused_columns=False, report_to=[], save_strategy="no")
        trainer = KDTrainer(model=model, args=args, train_dataset=ds, data_collator=KDCollator(ds.domain_names),
                            router_config=cfg.router_loss_config())
        trainer.current_gradient_accumulation_steps = accumulation
        model.train()
        count = int(batch["loss_mask"].sum())
        loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(count))
        kd, _ = sparse_kd_loss(model, batch, trainer.kd_config, torch.tensor(count))
        count_only(model, batch["attention_mask"])
        aux = router_losses(model, cfg.router_loss_config()).loss
        assert aux > 0 and torch.is_tensor(aux) and aux.requires_grad
        scaled = trainer.model_accepts_loss_kwargs  # the Trainer divides by the accumulation itself otherwise
        torch.testing.assert_close(loss, kd + (aux / accumulation if scaled else aux))
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(count)),
                                       sparse_kd_loss(model, batch, trainer.kd_config, torch.tensor(count))[0])


def test_a_mixture_of_stores_is_read_as_kdstudent_train_reads_it(store, student_dir, tiny_teacher_dir, tmp_path):
    """StoreDataset(["A", "B:0.6"]) holds both stores' rows; KDTrainer samples each epoch in the order
    `kdstudent train` deals that mixture with the same seed (B at 60 % of the tokens), and trains on it."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from logit_store import KDStream
    from student.hf_trainer import MixtureSampler

    other = tmp_path / "other"
    data = tmp_path / "o.jsonl"
    data.write_text("".join(json.dumps({"text": t, "src": "c"}) + "\n" for t in synthetic_corpus(16, seed=9)))
    build(BuildConfig(teacher=tiny_teacher_dir, data=str(data), out=str(other), backend="hf", text_field="text",
                      domain_field="src", top_k=4, max_seq_len=64, progress=False))
    ds = StoreDataset([store, f"{other}:0.6"])
    a, b = list(LogitStore.open(store)), list(LogitStore.open(str(other)))
    assert len(ds) == len(a) + len(b) == 80 and ds.domain_names == ["a", "b", "c"]
    for i, ref in ((0, a[0]), (63, a[63]), (64, b[0]), (79, b[15])):
        assert ds[i].source_index == ref.source_index and np.array_equal(ds[i].target_ids, ref.target_ids)

    args = TrainingArguments(str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             remove_unused_columns=False, report_to=[], save_strategy="no", seed=3,
                             disable_tqdm=True)
    trainer = KDTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=args, train_dataset=ds,
                        data_collator=KDCollator(ds.domain_names))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, MixtureSampler) and len(sampler) == 80
    plan = KDStream([store, str(other)], batch_size=1, weights=[None, 0.6], seed=3, rank=0, world_size=1)
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
        assert epochs[-1] == plan.epoch_order(epoch).tolist()
        tokens = np.array([ds[i].input_ids.size for i in epochs[-1]])
        from_b = np.array(epochs[-1]) >= 64
        assert tokens[from_b].sum() / tokens.sum() == pytest.approx(0.6, abs=0.05)
    assert epochs[0] != epochs[1]
    # resumed in epoch 2 on 2 processes: accelerate wraps the sampler in a batch-sampler shard, which has no
    # set_epoch; the epoch reaches the sampler through the dataset
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    def ids(rows):
        return [(r.domain, r.source_index) for r in rows]

    loader = prepare_data_loader(torch.utils.data.DataLoader(ds, sampler=MixtureSampler(ds, seed=3), batch_size=4,
                                                             collate_fn=ids),
                                 num_processes=2, process_index=0, put_on_device=False)
    resumed = skip_first_batches(loader, 1)
    resumed.set_epoch(2)
    assert next(iter(resumed)) == ids(ds[i] for i in plan.epoch_order(2)[8:12])  # this process's second batch
    ds.set_epoch(0)
    assert StoreDataset(store).stores and not isinstance(KDTrainer(
        model=trainer.model, args=args, train_dataset=StoreDataset(store))._get_train_sampler(), MixtureSampler)
    trainer.train()
    assert trainer.state.global_step == 3 and np.isfinite(trainer.state.log_history[-1]["train_loss"])
