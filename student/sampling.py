"""A model's samples for one prompt with transformers' `generate`, exactly reproducible for a seed: what
`kdstudent generate --backend hf` writes and what `kdstudent eval` compares with the teacher's responses (ROUGE-L)."""

from __future__ import annotations

import numpy as np
import torch


def eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every id that ends a response: the model's generation config's and the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return sorted({int(e) for e in eos if e is not None} | ({tokenizer.eos_token_id} - {None}))


@torch.no_grad()
def sample_hf(model: torch.nn.Module, eos: list[int], prompt: np.ndarray, samples: int, max_new_tokens: int,
              temperature: float, top_p: float, seed: int) -> list[dict]:
    """The samples of one prompt (transformers `generate` on this prompt alone, under its own seed; temperature 0
    is greedy): response ids up to and including the first EOS, the model's log-prob of each sampled token (its
    own distribution at temperature 1, before temperature and top-p), and why it stopped."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt, device=device)[None]
    torch.manual_seed(seed)
    greedy = temperature == 0
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=not greedy, temperature=None if greedy else temperature,
                         top_p=None if greedy else top_p, top_k=None, num_return_sequences=samples,
                         eos_token_id=eos, pad_token_id=eos[0], output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, ids.shape[1]:]
    logprobs = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, new[..., None])[..., 0]
    result = []
    for row, lp in zip(new.tolist(), logprobs.tolist(), strict=True):
        end = next((t + 1 for t, token in enumerate(row) if token in eos), None)
        result.append({"response_ids": row[:end], "logprobs": lp[:end], "finish_reason": "stop" if end else "length"})
    return result
