"""Teachers that are what they claim: GGUF conversion keeps the file's BOS/EOS rule, the tokenizer fingerprint
sees special-token behaviour (old stores still match), `--dtype auto` is one dtype on both backends, and vLLM's
context (and CPU KV cache) follows --max-seq-len, not the model's native context."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from assets.smollm2 import CONVERSION_VERSION, convert_gguf, gguf_special_token_flags
from assets.synthetic import synthetic_corpus, train_tokenizer
from logit_store import LogitStore
from logit_store.build import BuildConfig, _teacher_options, build
from logit_store.fingerprint import (
    TOKENIZER_FINGERPRINT_VERSION,
    special_tokens_added,
    tokenizer_fingerprint,
    tokenizer_matches,
)
from logit_store.teachers import SOURCE_RECORD, TeacherError, TeacherWarning, load_teacher
from logit_store.teachers.vllm import CPU_KV_FLOOR, cpu_kv_cache_bytes

BOS, EOS = "<|endoftext|>", "<|end|>"  # tokens of the tiny tokenizer the GGUFs below name as BOS and EOS


# ---------------------------------------------------------------- a tiny GGUF, written here
def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py `permute`); transformers undoes it when it reads a GGUF."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str, teacher_dir: str, add_bos: bool | None, add_eos: bool | None) -> None:
    """The tiny teacher (weights in F32) and its byte-level BPE tokenizer as a llama GGUF, with the special-token
    flags given (None: the key is left out)."""
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(teacher_dir)
    w = load_file(os.path.join(teacher_dir, "model.safetensors"))
    tok = json.load(open(os.path.join(teacher_dir, "tokenizer.json")))
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    ids = {token: i for token, i in vocab}
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in special else 1 for token, _ in vocab])  # 3: control
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_bos_token_id(ids[BOS])
    writer.add_eos_token_id(ids[EOS])
    writer.add_pad_token_id(ids["<|pad|>"])
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_eos is not None:
        writer.add_add_eos_token(add_eos)
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    writer.add_tensor("token_embd.weight", w["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(w[layer + "self_attn.q_proj.weight"],
                                                               cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(w[layer + "self_attn.k_proj.weight"],
                                                               cfg.num_key_value_heads))
        for hf, ours in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", w[layer + hf + ".weight"])
    writer.add_tensor("output_norm.weight", w["model.norm.weight"])
    writer.add_tensor("output.weight", w["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _hello_ids(folder: str) -> tuple[list[int], list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok("hello").input_ids, tok("hello", add_special_tokens=False).input_ids


@pytest.mark.parametrize("add_bos,add_eos", [(True, False), (True, True), (False, None)])
def test_prepare_teacher_adds_exactly_what_the_gguf_says(tiny_teacher_dir, tmp_path, add_bos, add_eos):
    write_tiny_gguf(str(tmp_path / "tiny.gguf"), tiny_teacher_dir, add_bos, add_eos)
    assert gguf_special_token_flags(str(tmp_path / "tiny.gguf")) == {"add_bos_token": add_bos,
                                                                     "add_eos_token": add_eos}
    out = convert_gguf(str(tmp_path), "tiny.gguf", str(tmp_path / "teacher"), "float32")
    with_special, bare = _hello_ids(out)
    vocab = json.load(open(os.path.join(tiny_teacher_dir, "tokenizer.json")))["model"]["vocab"]
    assert with_special == [vocab[BOS]] * bool(add_bos) + bare + [vocab[EOS]] * bool(add_eos)
    record = json.load(open(os.path.join(out, SOURCE_RECORD)))
    assert record == {"conversion_version": CONVERSION_VERSION, "source": "tiny.gguf", "dtype": "float32",
                      "add_bos_token": add_bos, "add_eos_token": add_eos}
    # the weights came through: the converted teacher computes what the tiny teacher computes
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([bare * 3])
    want, got = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(ids).logits
                 for d in (tiny_teacher_dir, out))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_prepare_teacher_redoes_a_folder_of_the_old_conversion_in_place(tiny_teacher_dir, tmp_path):
    """The old code left a folder with config.json and no record (and returned early when config.json existed):
    preparing again converts anew into a temporary folder that takes the old one's place."""
    write_tiny_gguf(str(tmp_path / "tiny.gguf"), tiny_teacher_dir, True, None)
    out = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, out)  # a folder that does not add the BOS, as the old conversion wrote
    (out / "stale-from-old-version").write_text("x")
    assert _hello_ids(str(out))[0] == _hello_ids(str(out))[1]
    with open(out / "config.json") as f:  # a process reading the old folder keeps what it opened
        convert_gguf(str(tmp_path), "tiny.gguf", str(out), "float32")
        assert json.load(f)["model_type"] == "llama"
    assert not (out / "stale-from-old-version").exists()
    with_special, bare = _hello_ids(str(out))
    assert with_special[1:] == bare and len(with_special) == len(bare) + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher", "tiny.gguf"]  # no temporary folder left
    made = os.path.getmtime(out / "model.safetensors")
    convert_gguf(str(tmp_path), "tiny.gguf", str(out), "float32")  # up to date: nothing to do
    assert os.path.getmtime(out / "model.safetensors") == made


@pytest.mark.slow
def test_real_smollm2_conversion_honours_its_gguf(tmp_path):
    """SmolLM2-135M-Instruct's GGUF says add_bos_token = False (and nothing on EOS): the prepared tokenizer adds
    nothing around a text. (~20 s: converts the real model.)"""
    from assets.smollm2 import packaged_smollm2

    folder, name = packaged_smollm2()
    assert gguf_special_token_flags(os.path.join(folder, name)) == {"add_bos_token": False, "add_eos_token": None}
    out = convert_gguf(folder, name, str(tmp_path / "smollm2"))
    with_special, bare = _hello_ids(out)
    assert with_special == bare


# ---------------------------------------------------------------- the tokenizer fingerprint
@pytest.fixture(scope="module")
def tokenizers():
    """Two tokenizers that differ only in whether encoding adds the BOS."""
    plain = train_tokenizer(synthetic_corpus(40), vocab_size=300)
    plain.bos_token = BOS
    with_bos = train_tokenizer(synthetic_corpus(40), vocab_size=300)
    with_bos.bos_token = BOS
    with_bos.add_bos_token = True
    assert with_bos.get_vocab() == plain.get_vocab()
    return plain, with_bos


def _fingerprint_v1(tokenizer) -> str:
    """Version 1 exactly as stores written before fingerprint_version recorded it (frozen here on purpose)."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def test_the_fingerprint_sees_whether_a_bos_is_added(tokenizers):
    plain, with_bos = tokenizers
    assert special_tokens_added(plain) == {"before": [], "after": []}
    assert special_tokens_added(with_bos) == {"before": [plain.convert_tokens_to_ids(BOS)], "after": []}
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(with_bos)
    assert tokenizer_fingerprint(plain, 1) == tokenizer_fingerprint(with_bos, 1) == _fingerprint_v1(plain)
    templated = train_tokenizer(synthetic_corpus(40), vocab_size=300)
    templated.bos_token = BOS
    templated.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(templated) != tokenizer_fingerprint(plain)


def test_stores_of_either_fingerprint_version_match_their_tokenizer(tokenizers):
    plain, with_bos = tokenizers
    old = {"name_or_path": "t", "fingerprint": _fingerprint_v1(plain), "vocab_size": len(plain)}  # pre-v2 manifest
    assert tokenizer_matches(plain, old) and tokenizer_matches(with_bos, old)  # v1 could not tell them apart
    new = {"name_or_path": "t", "fingerprint": tokenizer_fingerprint(plain),
           "fingerprint_version": TOKENIZER_FINGERPRINT_VERSION}
    assert tokenizer_matches(plain, new) and not tokenizer_matches(with_bos, new)
    assert tokenizer_matches(plain, {})  # a store that records no tokenizer: nothing to disagree with
    assert not tokenizer_matches(train_tokenizer(synthetic_corpus(40, seed=1), vocab_size=280), old)
    with pytest.raises(ValueError, match="upgrade"):
        tokenizer_matches(plain, dict(new, fingerprint_version=TOKENIZER_FINGERPRINT_VERSION + 1))


# ---------------------------------------------------------------- kdstore build's BOS check
def _text_file(tmp_path) -> str:
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_corpus(3, seed=5)))
    return str(path)


def _copy_teacher(src: str, dst, config: dict | None = None, tokenizer: dict | None = None) -> str:
    shutil.copytree(src, dst)
    for name, changes in (("config.json", config), ("tokenizer_config.json", tokenizer)):
        d = json.load(open(os.path.join(dst, name)))
        d.update(changes or {})
        json.dump(d, open(os.path.join(dst, name), "w"))
    return str(dst)


def test_build_warns_before_loading_when_the_config_bos_is_not_added(tiny_teacher_dir, tmp_path, recwarn):
    teacher = _copy_teacher(tiny_teacher_dir, tmp_path / "t", config={"bos_token_id": 0}, tokenizer={"bos_token": BOS})
    unloadable = _copy_teacher(teacher, tmp_path / "no-weights")
    with open(os.path.join(unloadable, "model.safetensors"), "wb") as f:  # weights there, but unreadable
        f.write(b"not safetensors")
    cfg = BuildConfig(teacher=unloadable, data=_text_file(tmp_path), out=str(tmp_path / "s"), text_field="text",
                      backend="hf", progress=False)
    with pytest.warns(TeacherWarning, match="prepare-teacher.*--tokenizer"), \
            pytest.raises(TeacherError, match="cannot load teacher"):
        build(cfg)  # the warning comes before the teacher loads (this one cannot)
    # the tiny teacher as made: its config's bos_token_id (a Llama default) is no BOS of its tokenizer
    build(BuildConfig(teacher=tiny_teacher_dir, data=_text_file(tmp_path), out=str(tmp_path / "s2"),
                      text_field="text", backend="hf", progress=False, top_k=4))
    # a converted folder whose GGUF said not to add one
    (tmp_path / "t" / SOURCE_RECORD).write_text(json.dumps({"conversion_version": CONVERSION_VERSION,
                                                            "add_bos_token": False}))
    build(BuildConfig(teacher=teacher, data=_text_file(tmp_path), out=str(tmp_path / "s3"), text_field="text",
                      backend="hf", progress=False, top_k=4))
    assert not [w for w in recwarn if issubclass(w.category, TeacherWarning)]


# ---------------------------------------------------------------- dtype and context
@pytest.fixture(scope="module")
def long_bf16_teacher(tiny_teacher_dir, tmp_path_factory) -> str:
    """The tiny teacher saved in bfloat16, its config claiming a 131,072-token native context."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path_factory.mktemp("long_bf16"))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.bfloat16)
    model.config.max_position_embeddings = 131072
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(out)
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    return out


@pytest.mark.slow
def test_default_dtype_and_context_make_both_backends_write_the_same_store(long_bf16_teacher, tmp_path):
    """Real builds with default options on both backends (slow: a vLLM engine takes 30-60 s to start here)."""
    data = str(tmp_path / "text.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in synthetic_corpus(16, seed=7))
    stores = {}
    for backend in ("hf", "vllm"):
        cfg = BuildConfig(teacher=long_bf16_teacher, data=data, out=str(tmp_path / backend), text_field="text",
                          backend=backend, top_k=8, max_seq_len=48, progress=False)  # dtype left at "auto"
        teacher = load_teacher(backend, cfg.teacher, **_teacher_options(cfg))
        if backend == "vllm":  # sized from --max-seq-len, not the config's 131,072
            assert teacher.max_model_len == 49
            assert teacher.kv_cache_memory_bytes == CPU_KV_FLOOR
        build(cfg, teacher=teacher)
        stores[backend] = LogitStore.open(cfg.out)
    assert stores["hf"].manifest.teacher["dtype"] == stores["vllm"].manifest.teacher["dtype"] == "float32"
    same = total = 0
    for a, b in zip(stores["hf"], stores["vllm"], strict=True):
        assert a.source_index == b.source_index and (a.input_ids == b.input_ids).all()
        for x, y in zip(a.target_ids.tolist(), b.target_ids.tolist(), strict=True):
            same += set(x) == set(y)
            total += 1
    print(f"default builds: top-8 sets agree at {same}/{total} positions")  # (shown with pytest -s)
    assert total > 300 and same / total >= 0.99, f"top-8 sets agree at {same}/{total} positions"


def test_vllm_context_and_kv_cache_follow_the_rows(long_bf16_teacher):
    from transformers import AutoConfig

    def options(**kw):
        return _teacher_options(BuildConfig(teacher="t", data="d", out="o", backend="vllm", **kw))

    assert options(max_seq_len=2048)["options"].max_model_len == 2049
    assert options(max_seq_len=256, generate=True, max_new_tokens=1024)["options"].max_model_len == 257
    assert options(max_seq_len=256, max_model_len=4096)["options"].max_model_len == 4096
    assert options(max_seq_len=256)["dtype"] == "float32" and options(dtype="bfloat16")["dtype"] == "bfloat16"
    with pytest.raises(TeacherError, match="--max-model-len 100 is shorter"):
        options(max_seq_len=256, max_model_len=100)
    config = AutoConfig.from_pretrained(long_bf16_teacher)  # 2 layers x 1 KV head x 32 dims x K,V x 4 bytes
    assert cpu_kv_cache_bytes(config, "float32", 49) == CPU_KV_FLOOR
    assert cpu_kv_cache_bytes(config, "float32", 1 << 20) == 2 * ((1 << 20) + 128) * 512
    assert cpu_kv_cache_bytes(config, "bfloat16", 1 << 20) == 2 * ((1 << 20) + 128) * 256
