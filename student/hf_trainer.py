"""Distilling from a store with transformers' `Trainer` (or anything built on it): dataset, collator, loss.

`kdstudent train` is this project's own loop (MoE-LoRA students, router losses, exact reader resume). Users who
already train with `transformers.Trainer` keep their loop and take three pieces from here (docs/HF_TRAINER.md):

- `StoreDataset`: a store as a map-style torch Dataset of decoded rows (the reader's `LogitStore` decodes them),
  so the Trainer's own sampler shuffles, shards across processes, counts epochs and skips batches on resume.
- `KDCollator`: rows -> a batch: the `KDBatch` tensors of `logit_store.stream.collate`, except that `labels`
  follow the transformers convention (labels[t] = token t, the model shifts), so that `model(**batch)` gives the
  plain CE loss. The target tensors stay aligned with the logits (position t describes token t + 1).
- `sparse_kd_loss(model, inputs)`: the KD loss of `student.losses.distill_loss` (its chunked LM head: never [batch,
  seq, vocab] logits) on the model's final hidden states, plus a MoE-LoRA student's router losses. It runs the
  model's own forward, through any DDP/peft wrapper, with `logits_to_keep=1` and `output_hidden_states=True`, so
  data parallelism syncs gradients as for any forward. `KDTrainer` is a Trainer whose `compute_loss` is that.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
from torch import nn
from transformers import Trainer

from logit_store import DecodedRow, LogitStore, collate
from logit_store.model_logits import logit_transform
from logit_store.plan import (
    DecodedBatches,
    ReadPlan,
    RowIndex,
    check_store_for_model,
    domain_names,
    open_stores,
    parse_store_spec,
)
from student.config import RouterLossConfig, is_moe_student
from student.losses import DistillLossConfig, distill_loss


class StoreDataset(torch.utils.data.Dataset):
    """The rows of a store by index (store order), decoded (`DecodedRow`), for `transformers.Trainer`; or of a
    mixture of stores, given as `kdstudent train --store` specs ("path[:weight]", a weight being a share of the
    loss positions, or with `mix_by="tokens"` of the rows' tokens), concatenated in the order given.

    A row is read with its whole Arrow record batch (the store's unit of compression); the last `cache_units`
    decoded record batches are kept, so neighbouring indices are cheap and a random index costs one record
    batch read (docs/HF_TRAINER.md gives the figures). `tokenizer`, if given, must be the store's (same
    fingerprint): else token ids would mean different things to the student. Stores of a mixture must share one
    tokenizer and vocabulary; `KDTrainer` samples a mixture as `kdstudent train` reads it (`MixtureSampler`).

    Each shard's sha256 is taken once per run, by the first process that needs it: the Trainer's DataLoader
    workers, new ones every epoch, share one ledger with this process (`LogitStore.share_hash_checks`).
    """

    def __init__(self, store: str | LogitStore | list[str | LogitStore], tokenizer=None, cache_units: int = 4,
                 mix_by: str = "positions"):
        specs = [(s, None) if isinstance(s, LogitStore) else parse_store_spec(s)
                 for s in (store if isinstance(store, list) else [store])]
        self.stores = open_stores([s for s, _ in specs])  # each once, mixable, sharing hash checks with workers
        self.weights = [w for _, w in specs]
        self.mix_by = mix_by  # what the weights are shares of: "positions" (loss positions) or "tokens"
        if tokenizer is not None:
            for s in self.stores:
                check_store_for_model(s, tokenizer, tokenizer_name=getattr(tokenizer, "name_or_path", "given"))
        self.index = RowIndex(self.stores)
        self.decoded = DecodedBatches(self.index, capacity=cache_units)
        self.epoch = 0  # a mixture's epoch, for MixtureSampler

    @property
    def store(self) -> LogitStore:
        """The store, when there is one (a mixture has `stores`)."""
        if len(self.stores) != 1:
            raise AttributeError(f"a mixture of {len(self.stores)} stores has no single store: use .stores")
        return self.stores[0]

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's data loader each epoch (also where it cannot reach the sampler: several processes
        wrap it in a batch-sampler shard); MixtureSampler orders the epoch it says."""
        self.epoch = epoch

    @property
    def domain_names(self) -> list[str]:
        """The stores' domains, in order: a batch's `domain` index points into this list."""
        return domain_names(self.stores)

    def __len__(self) -> int:
        return self.index.rows

    def __getitem__(self, index: int) -> DecodedRow:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range: the dataset has {len(self)} rows")
        unit = int(self.index.unit_of(index))
        return self.decoded.get(unit)[index - int(self.index.unit_start[unit])]


class MixtureSampler(torch.utils.data.Sampler[int]):
    """Each epoch's row order of a `StoreDataset` mixture, exactly as `kdstudent train` deals it with the same
    seed, shuffle buffer and `mix_by` (the `ReadPlan`'s epoch order: every store at its share of the loss
    positions, or of the tokens, every row of a store at the same rate, rows of the stores interleaved at seeded
    places; `mix_by` is the dataset's). The epoch is the dataset's, which the Trainer's data loader sets
    each epoch (also on resume, and with several processes); its batch sharding and resume (skipping the epoch's
    first batches) then work as with its own sampler."""

    def __init__(self, dataset: StoreDataset, seed: int = 0, shuffle_buffer: int = 1024):
        self.dataset = dataset
        self.plan = ReadPlan(dataset.index, batch_size=1, weights=dataset.weights, seed=seed,
                             shuffle_buffer=shuffle_buffer, mix_by=dataset.mix_by)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.plan.rows

    def __iter__(self):
        return iter(self.plan.epoch_order(self.dataset.epoch).tolist())


class KDCollator:
    """`DecodedRow`s -> a Trainer batch: `collate`'s `KDBatch`, with `labels` in the transformers convention.

    Keys: input_ids, attention_mask, labels ([B, T]: token t where token t carries a loss, else -100; the model
    shifts), loss_mask, target_ids, target_logprobs, target_mask, target_tail (aligned with the logits: position
    t describes token t + 1), source_index, domain (an index into `domains`, -1 for none).
    """

    def __init__(self, domains: list[str] | None = None, pad_id: int = 0, cross=None):
        """`cross`: a `student.cross_tokenizer.CrossTokenizerCollator`, for a student of another tokenizer than the
        store's (then train with `DistillLossConfig(cross_tokenizer="gold" or "uld")`)."""
        self.domains, self.pad_id, self.cross = domains, pad_id, cross

    def __call__(self, rows: list[DecodedRow]) -> dict[str, torch.Tensor]:
        batch = dict((self.cross or collate)(rows, self.pad_id, self.domains))
        batch["labels"] = unshift_labels(batch["labels"])
        return batch


def unshift_labels(shifted: torch.Tensor) -> torch.Tensor:
    """KDBatch labels (position t holds token t + 1) -> transformers labels (position t holds token t)."""
    out = torch.full_like(shifted, -100)
    out[:, 1:] = shifted[:, :-1]
    return out


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """transformers labels -> KDBatch labels: the inverse of `unshift_labels`."""
    out = torch.full_like(labels, -100)
    out[:, :-1] = labels[:, 1:]
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile / accelerate wrappers (a peft model stays a peft model)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def sparse_kd_loss(model: nn.Module, inputs: dict[str, torch.Tensor], config: DistillLossConfig | None = None,
                   num_items_in_batch: torch.Tensor | int | None = None,
                   router_config: RouterLossConfig | None = None) -> tuple[torch.Tensor, dict]:
    """The sparse KD (+ CE) loss of a causal LM on a `KDCollator` batch: (loss, metrics of `distill_loss`).

    The loss is the sum over the batch's loss tokens divided by `num_items_in_batch` when given (the Trainer's
    count of label tokens over the whole accumulated, all-process batch), else by this batch's count. The forward
    is the model's own (`model` may be wrapped in DDP or peft) with `logits_to_keep=1`: the LM head is applied to
    one position per row in the forward and, chunk by chunk, to the loss positions in `distill_loss`.

    For a MoE-LoRA student (`kdstudent convert`), the metrics also hold `router_loss`: its load-balance and z-losses
    of this forward (coefficients from `router_config`, default `RouterLossConfig()`; padding excluded), with
    their gradient, a mean over this micro-batch's tokens; `KDTrainer` adds it to the loss, as `kdstudent train`
    does.
    """
    from student.router_loss import count_only, router_losses

    cfg = replace(config or DistillLossConfig(), reduction="sum")
    inner = _unwrap(model)
    if "logits_to_keep" not in inspect.signature(_forward_of(inner)).parameters:
        raise ValueError(f"{type(inner).__name__}.forward takes no logits_to_keep: sparse_kd_loss needs it so that "
                         "the forward does not build [batch, seq, vocab] logits (transformers causal LMs take it)")
    moe = is_moe_student(inner)
    if moe:
        count_only(inner, inputs["attention_mask"])
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1]  # after the final norm: what the LM head reads
    head = inner.get_output_embeddings()
    batch = dict(inputs, labels=shift_labels(inputs["labels"]))
    loss_sum, metrics = distill_loss(hidden, head.weight, batch, cfg, getattr(head, "bias", None),
                                     logit_transform(inner))  # the logits the model serves (scaling, softcap)
    count = num_items_in_batch if num_items_in_batch is not None else metrics["tokens"]
    if torch.is_tensor(count):
        count = count.to(loss_sum.device)
    loss = loss_sum / (count.clamp(min=1) if torch.is_tensor(count) else max(count, 1))
    if moe:
        r = router_losses(inner, router_config)
        metrics = dict(metrics, router_loss=r.loss, balance=r.balance.detach(), z=r.z.detach())
    return loss, metrics


def _forward_of(model: nn.Module):
    """The forward that takes the model's arguments (a peft model's base model's)."""
    get_base = getattr(model, "get_base_model", None)
    return (get_base() if callable(get_base) else model).forward


class KDTrainer(Trainer):
    """`transformers.Trainer` that distils from `StoreDataset` batches with `sparse_kd_loss` (`kd_config`, and a
    MoE-LoRA student's router losses weighted by `router_config`).

    The loss is normalised like the Trainer's own causal-LM loss: by the label tokens of the whole accumulated
    batch over all processes when the Trainer counts them (models whose forward takes **kwargs), so gradient
    accumulation and data parallelism give the gradient of one big batch. Evaluation returns the loss only.
    """

    def __init__(self, *args, kd_config: DistillLossConfig | None = None,
                 router_config: RouterLossConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_config = kd_config or DistillLossConfig()
        self.router_config = router_config or RouterLossConfig()
        self._check_stores(self.train_dataset, self.eval_dataset)

    def _check_stores(self, *datasets) -> None:
        """Before any step, what `kdstudent train` checks (`plan.check_store_for_model`): the model's vocabulary
        holds every stored id, and the Trainer's tokenizer (`processing_class`, when it is one) is the stores'.
        Else the loss would index past the LM head, or run and mean nothing."""
        vocab = _unwrap(self.model).get_output_embeddings().weight.shape[0]
        tokenizer = self.processing_class if hasattr(self.processing_class, "get_vocab") else None
        name = getattr(tokenizer, "name_or_path", "the Trainer's processing_class")
        for dataset in datasets:
            for part in dataset.values() if isinstance(dataset, dict) else [dataset]:
                for store in part.stores if isinstance(part, StoreDataset) else []:
                    check_store_for_model(store, tokenizer, vocab, name, self.kd_config.cross_tokenizer)

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        self._check_stores(eval_dataset)
        return super().evaluate(eval_dataset, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = sparse_kd_loss(model, inputs, self.kd_config, num_items_in_batch, self.router_config)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count spans all processes
        if "router_loss" in metrics and model.training:  # MoE-LoRA: a mean per micro-batch, averaged over them
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:  # the Trainer's own rule for whether it divides the loss by the accumulation steps
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                    or self.compute_loss_func is not None
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            loss = loss + (metrics["router_loss"] / steps if scaled else metrics["router_loss"])
        return (loss, metrics) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        """A mixture of stores is read as `kdstudent train` reads it; one store by the Trainer's own sampler."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if isinstance(dataset, StoreDataset) and len(dataset.stores) > 1:
            return MixtureSampler(dataset, self.args.seed if self.args.data_seed is None else self.args.data_seed)
        return super()._get_train_sampler(train_dataset)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss only: there are no [batch, seq, vocab] logits to return."""
        return super().prediction_step(model, inputs, True, ignore_keys)
