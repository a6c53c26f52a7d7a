"""Exact teacher targets from a transformers causal LM, with the LM head applied over chunks of positions."""

from __future__ import annotations

import numpy as np
import torch

from ..codecs import TopKTargets


class HFTeacher:
    """Full-vocabulary forward of a transformers model; never holds [batch, seq, vocab] logits at once."""

    def __init__(self, model, chunk_positions: int = 1024):
        cfg = model.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            raise NotImplementedError(f"{type(model).__name__} post-processes its logits; not supported yet")
        self.model = model.eval()
        self.body = model.base_model
        self.head = model.get_output_embeddings()
        self.chunk = chunk_positions

    @property
    def vocab_size(self) -> int:
        return int(self.head.weight.shape[0])

    @torch.no_grad()
    def topk(self, rows: list[tuple[np.ndarray, np.ndarray]], k: int) -> list[TopKTargets]:
        """For each (input_ids [T], loss_mask [T]): top-k of the distribution predicting each masked token.

        The tail is exact: the log of the probability mass of all ids outside the top-k.
        """
        device = self.head.weight.device
        seq = max(len(ids) for ids, _ in rows)
        ids = torch.zeros(len(rows), seq, dtype=torch.long)
        attn = torch.zeros(len(rows), seq, dtype=torch.long)
        for b, (x, _) in enumerate(rows):
            ids[b, : len(x)] = torch.as_tensor(x)
            attn[b, : len(x)] = 1
        hidden = self.body(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
        out = []
        for b, (_, mask) in enumerate(rows):
            pos = torch.as_tensor(np.flatnonzero(mask) - 1, device=device)  # logits at t predict token t + 1
            h = hidden[b, pos]
            top_ids, top_lp, tails = [], [], []
            for lo in range(0, h.shape[0], self.chunk):
                logits = self.head(h[lo : lo + self.chunk]).float()
                lse = logits.logsumexp(-1, keepdim=True)
                v, i = logits.topk(k, dim=-1)
                rest = logits.scatter(-1, i, float("-inf")).logsumexp(-1, keepdim=True)
                top_ids.append(i)
                top_lp.append(v - lse)
                tails.append((rest - lse).squeeze(-1))
            out.append(TopKTargets(torch.cat(top_ids).cpu().numpy(), torch.cat(top_lp).cpu().numpy(),
                                   torch.cat(tails).double().cpu().numpy()))
        return out
