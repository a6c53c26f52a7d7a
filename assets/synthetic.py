"""Offline stand-ins for demos and tests: a generated corpus, a BPE tokenizer trained on it, a tiny teacher.

Nothing here downloads anything. The tiny teacher is a 2-layer Llama (head_dim 32, which vLLM's CPU
attention supports) trained for a few seconds on the corpus so its distributions are peaked, like a real LM's.
"""

from __future__ import annotations

import random

import torch

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird", "the farmer",
             "our neighbour", "the river", "a stranger"]
_VERBS = ["sees", "likes", "follows", "paints", "finds", "remembers", "carries", "watches", "calls", "helps"]
_OBJECTS = ["the red house", "a green field", "the morning light", "an empty boat", "the long road",
            "a quiet song", "the winter garden", "a bright star", "the open door", "an old letter"]
_ENDINGS = [".", " today.", " again.", " at night.", " in the rain.", " with care.", " every day."]


def synthetic_corpus(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Short documents of simple English sentences from a fixed grammar (deterministic for a seed)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
                     for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(s[0].upper() + s[1:] for s in sentences))
    return docs


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers (with a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", additional_special_tokens=special[2:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A randomly initialised Llama small enough for tests: 2 heads of 32, 1 KV head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=1,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def make_tiny_teacher(folder: str, n_docs: int = 200, steps: int = 80, seed: int = 0) -> list[str]:
    """Write a trained tiny teacher + tokenizer to `folder` (loadable by transformers and vLLM).

    Returns the corpus it was trained on.
    """
    texts = synthetic_corpus(n_docs, seed)
    tok = train_tokenizer(texts)
    model = tiny_llama(len(tok), seed)
    enc = [tok(t).input_ids for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rng.sample(enc, 16)
        seq = max(map(len, batch))
        ids = torch.full((16, seq), tok.pad_token_id)
        labels = torch.full((16, seq), -100)
        for i, e in enumerate(batch):
            ids[i, : len(e)] = torch.tensor(e)
            labels[i, : len(e)] = torch.tensor(e)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return texts
