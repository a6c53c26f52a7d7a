"""`hf` backend: exact targets from a transformers causal LM, the LM head applied over chunks of positions.

The reference backend: it sees the full vocabulary, so its tails are exact and its `sampled` draws come from
the whole distribution (unbiased). Also the CPU fallback.
"""

from __future__ import annotations

import numpy as np
import torch

from ..codecs import SampledTargets, TopKTargets, sampled_from_draws
from ..model_logits import LogitTransformError, check_served_logits, logit_transform
from .base import Row, Teacher, TeacherError, draws_from_topk, resolve_dtype


class HFTeacher(Teacher):
    """Never holds [batch, seq, vocab] logits: hidden states once, then the head over `chunk_positions`, each chunk
    post-processed as the model's own forward does (`model_logits`: Granite's scaling, Gemma-2's softcap, ...)."""

    backend = "hf"

    def __init__(self, model, name_or_path: str = "", dtype: str = "float32", chunk_positions: int = 1024,
                 batch_tokens: int = 16384):
        cfg = model.config
        try:  # the stored distribution is what model(...).logits gives: its family's post-processing included
            self.transform = check_served_logits(model)
        except LogitTransformError as e:
            raise TeacherError(f"hf backend: {e}") from None
        self.model = model.eval()
        self.body = model.base_model
        self.head = model.get_output_embeddings()
        self.chunk, self.batch_tokens = chunk_positions, batch_tokens
        self.name_or_path = name_or_path or getattr(cfg, "_name_or_path", "")
        self.dtype = dtype
        self.vocab_size = int(self.head.weight.shape[0])

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "auto", device: str | None = None, **kw) -> HFTeacher:
        """Load a teacher folder in `dtype` (`auto`: float32, as on every backend; see `resolve_dtype`)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as e:  # the same failures as the weights' below, reported the same way
            raise TeacherError(f"cannot load teacher {path!r} with transformers ({type(e).__name__}: {e})") from e
        try:  # an unknown logit post-processing is refused by name before any weight loads
            logit_transform(config)
        except LogitTransformError as e:
            raise TeacherError(f"hf backend: {e}") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, resolve_dtype(dtype)))
        except Exception as e:  # missing, unreadable or corrupt files (OSError, SafetensorError, ...): name the teacher
            raise TeacherError(f"cannot load teacher {path!r} with transformers ({type(e).__name__}: {e})") from e
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), path, str(model.dtype).removeprefix("torch."), **kw)

    # ------------------------------------------------------------ forward
    @torch.no_grad()
    def _logit_chunks(self, rows: list[Row]):
        """Yields (row index, [n, V] fp32 logits of that row's loss positions), a chunk at a time."""
        device = self.head.weight.device
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        groups, group, longest = [], [], 0
        for i in order:  # similar lengths together, at most batch_tokens padded tokens per forward
            longest = max(longest, len(rows[i][0]))
            if group and longest * (len(group) + 1) > self.batch_tokens:
                groups.append(group)
                group, longest = [], len(rows[i][0])
            group.append(i)
        groups.append(group)
        for group in groups:
            seq = max(len(rows[i][0]) for i in group)
            ids = torch.zeros(len(group), seq, dtype=torch.long)
            attn = torch.zeros(len(group), seq, dtype=torch.long)
            for b, i in enumerate(group):
                ids[b, : len(rows[i][0])] = torch.as_tensor(rows[i][0])
                attn[b, : len(rows[i][0])] = 1
            hidden = self.body(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
            for b, i in enumerate(group):
                pos = torch.as_tensor(np.flatnonzero(rows[i][1]) - 1, device=device)  # logits at t predict t + 1
                h = hidden[b, pos]
                for lo in range(0, h.shape[0], self.chunk):
                    yield i, self.transform.apply_(self.head(h[lo : lo + self.chunk]).float())

    def topk(self, rows: list[Row], k: int) -> list[TopKTargets]:
        parts: list[list] = [[] for _ in rows]
        labels = [torch.as_tensor(ids[np.flatnonzero(mask)]) for ids, mask in rows]  # each position's own token
        done = [0] * len(rows)
        for i, logits in self._logit_chunks(rows):
            lse = logits.logsumexp(-1, keepdim=True)
            v, idx = logits.topk(k, dim=-1)
            rest = logits.scatter(-1, idx, float("-inf")).logsumexp(-1)  # exact tail, even when tiny
            own = labels[i][done[i]:done[i] + len(logits)].to(logits.device)
            done[i] += len(logits)
            label_lp = (logits.gather(-1, own[:, None])[:, 0] - lse[:, 0]).clamp(max=0.0)
            parts[i].append((idx.cpu(), (v - lse).cpu(), (rest - lse[:, 0]).double().cpu(), label_lp.cpu()))
        return [TopKTargets(*(torch.cat(c).numpy() for c in zip(*p, strict=True))) for p in parts]

    def sample(self, rows: list[Row], n: int, seeds: list[int], from_top_k: int | None) -> list[SampledTargets]:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        rngs = [np.random.default_rng(int(s)) for s in seeds]
        draws: list[list] = [[] for _ in rows]
        for i, logits in self._logit_chunks(rows):
            if from_top_k:  # top-K + one tail bucket: biased (the build refuses it); tests/test_rs_kd.py measures it
                v, idx = logits.log_softmax(-1).topk(from_top_k, dim=-1)
                draws[i].append(draws_from_topk(idx.cpu().numpy(), v.cpu().numpy(), n, rngs[i]))
            else:
                probs = logits.softmax(-1).cpu()
                draws[i].append(torch.multinomial(probs, n, replacement=True, generator=gens[i]).numpy())
        return [sampled_from_draws(np.concatenate(d)) for d in draws]

    @torch.no_grad()
    def generate(self, prompts: list[np.ndarray], max_new_tokens: int, temperature: float,
                 seeds: list[int]) -> list[np.ndarray]:
        device = self.head.weight.device
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            torch.manual_seed(int(seed))
            ids = torch.as_tensor(prompt, device=device)[None]
            gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=temperature > 0, temperature=temperature or None, top_k=None,
                                      top_p=None)
            out.append(gen[0, ids.shape[1]:].cpu().numpy())
        return out
