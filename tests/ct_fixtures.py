"""Tiny tokenizers that split text differently, built offline with `tokenizers`, for the cross-tokenizer tests:
byte-level BPE (GPT-2/SmolLM2 style), SentencePiece-style BPE with byte fallback (Llama/Gemma style) and a
Unigram with a dummy prefix (T5/ALBERT style)."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from assets.synthetic import synthetic_corpus, train_tokenizer

CORPUS = ["The year 2024 had 365 days; 3.14159 is pi.", "naïve café — 日本語 テキスト 🙂 emoji",
          "  leading spaces\tand tabs\n\nnew lines", "Digits 0123456789 and 1,000,000.50 numbers",
          "Hello world, hello World! HELLO."] * 20 + synthetic_corpus(60)


def byte_level(vocab: int = 400) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE (eos <|endoftext|>, no BOS)."""
    return train_tokenizer(CORPUS, vocab_size=vocab)


def sentencepiece_bpe(vocab: int = 300) -> PreTrainedTokenizerFast:
    """Gemma-style BPE: spaces as `▁`, byte fallback `<0xNN>` for what the vocabulary lacks; adds a BOS."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>", "<bos>"],
                                                        show_progress=False))
    d = json.loads(tok.to_str())
    for b in range(256):
        d["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(d["model"]["vocab"]))
    d["model"]["byte_fallback"] = True
    d["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                                                                    {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
                           "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(d)), eos_token="<eos>",
                                   bos_token="<bos>", pad_token="<pad>")


def unigram(vocab: int = 200) -> PreTrainedTokenizerFast:
    """SentencePiece Unigram with a dummy prefix (`▁` before every text it encodes)."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>", "<unk>"],
                                                            unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
