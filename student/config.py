"""The options of a student, declared once: its shape (`MoELoRAConfig`), its routers' losses (`RouterLossConfig`)
and a training run (`TrainConfig`).

Both are dataclasses with help text, read from flags or one YAML/JSON file by `cli.config.parse_config`
(transformers' HfArgumentParser, which takes `--flag-name` and `--flag_name` alike). `kdstudent convert` and
`kdstudent params` parse `MoELoRAConfig`; `kdstudent train` parses `TrainConfig`, which *is* a `MoELoRAConfig`
plus the run's own options, and hands the two parts over with `student_config()` and `loss_config()` (as vLLM's
EngineArgs hands out its configs). So a shape option has one name, one help text and one default rule, whichever
door it comes in by.

One alpha rule for every LoRA (experts, shared expert, attention, the dense-LoRA baseline) and both scalings: an
unset alpha is 2 × its rank. It is resolved when the config is made, so saved configs hold the value used.
`lora_scaling` says how alpha scales the update: alpha / rank (standard) or alpha / √rank (rsLoRA); docs/STUDENT.md
has the measurement behind the default.

Also here: the layer-selection syntax of `keep_layers`/`moe_layers`/`layer_experts` with its parsers, and
`StudentSpec`, the recipe a built student carries (as `model.kd_student`) to be saved and rebuilt.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

from logit_store.plan import MIX_BY, parse_store_specs
from student.losses import DistillLossConfig

# how the experts are computed: "auto" picks grouped GEMM on CUDA, the compiled SwiGLU kernel on CPU where it
# applies, else "loop" (the autograd reference); "fused" runs the compiled path's functions eagerly (tests)
EXPERT_IMPLS = ("auto", "compiled", "fused", "loop", "grouped")
# how alpha scales a LoRA update: alpha / rank, or rsLoRA's alpha / sqrt(rank)
LORA_SCALINGS = ("standard", "rslora")
# how a MoE layer picks and weighs its experts: a learned router, a fixed hash of the input token id, or every
# expert always on with weight 1 (the last two are study v3's controls: routing fixed, and no routing at all)
ROUTINGS = ("learned", "hash", "all")
DEFAULT_ROUTER_INIT_STD = 0.02
# where a training reports its metrics besides metrics.jsonl (HF Trainer's --report_to, the ones we support)
REPORT_TO = ("none", "tensorboard")
LAYERS_SYNTAX = "all | none | top-half | bottom-half | every-other | a list '0,2,5' | ranges '0-3' | a slice '::2'"
# said in the help of the settings a `kdstudent train --resume` may change (`resumable`): how the run goes on, not
# what it trains. Every other setting must be the run's, or the resume is refused naming it (student.run)
RESUME_MAY_CHANGE = "May change on --resume"

# names that student.json / train_config.json files of earlier versions used
_RENAMED = {
    "num_experts": "experts",
    "top_k": "experts_per_token",
    "experts_top_k": "experts_per_token",
    "dropout": "lora_dropout",
    "experts_per_layer": "layer_experts",
}


# what earlier versions kept in a student's shape although only training uses it (now in TrainConfig)
_TRAINING_ONLY = {"balance_coef", "z_coef", "router_bias_update", "router_lr_scale"}


def resumable(help_text: str, how: str = "") -> str:
    """The help of a setting a --resume may change: declared where the setting is, so that --help, the generated
    option tables and the resume check (`may_change_on_resume`) all read the one declaration."""
    return f"{help_text}. {RESUME_MAY_CHANGE}{f' ({how})' if how else ''}"


def may_change_on_resume(name: str) -> bool:
    """Whether a `kdstudent train --resume` may give TrainConfig field `name` another value than the run's."""
    return RESUME_MAY_CHANGE in next(f for f in dataclasses.fields(TrainConfig) if f.name == name).metadata["help"]


def default_alpha(rank: int) -> float:
    """The LoRA alpha used when none is given, for every LoRA and both scalings: 2 × rank."""
    return 2.0 * rank


def lora_scale(alpha: float, rank: int, scaling: str) -> float:
    """The factor a LoRA update B·A is multiplied by: alpha / rank (standard) or alpha / sqrt(rank) (rslora)."""
    if scaling == "standard":
        return alpha / rank
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    raise ValueError(f"lora_scaling must be one of {LORA_SCALINGS}, got {scaling!r}")


@dataclass
class MoELoRAConfig:
    """Shape of a MoE-LoRA student; saved with it (student.json), so it stays JSON-serialisable."""

    keep_layers: str | None = field(default=None, metadata={
        "help": f"keep only these layers of the base ({LAYERS_SYNTAX}; e.g. '::2' keeps every other): a smaller "
                "student of the base's family, sharing its tokenizer. Unset: all layers"})
    experts: int = field(default=8, metadata={"help": "experts per MoE layer"})
    experts_per_token: int = field(default=2, metadata={
        "help": "experts each token is routed to (the router's top-k; their weights are renormalised). Equal to "
                "--experts: soft routing, every expert on every token, computed batched without top-k dispatch"})
    routing: str = field(default="learned", metadata={
        "help": "how experts are chosen: learned (a trained router, top-k, renormalised weights), hash (no router: "
                "each token id goes to a fixed, seeded choice of --experts-per-token distinct experts, weight 1/k "
                "each) or all (no router: every expert on every token with weight 1, i.e. the shared expert plus one "
                "rank experts×rank LoRA split in blocks; needs --experts-per-token = --experts). hash and all have no "
                "balance or z loss and do not export to Mixtral",
        "choices": list(ROUTINGS)})
    rank: int = field(default=16, metadata={
        "help": "LoRA rank of each expert (kdstudent train --student lora: of every projection)"})
    alpha: float | None = field(default=None, metadata={
        "help": "LoRA alpha of the experts (and of --student lora); the update is scaled by alpha / rank, or "
                "alpha / √rank with --lora-scaling rslora. Unset: 2 × rank (the one rule for every LoRA)"})
    lora_scaling: str = field(default="standard", metadata={
        "help": "how alpha scales every LoRA update (experts, shared expert, attention, --student lora): standard "
                "alpha / rank, or rslora alpha / √rank (rank-stabilised; pair it with a fixed --alpha for "
                "per-step update sizes that do not grow with rank; see docs/STUDENT.md)",
        "choices": list(LORA_SCALINGS)})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA inputs (experts and attention)"})
    moe_layers: str = field(default="all", metadata={"help": f"which MLPs become MoE layers: {LAYERS_SYNTAX}"})
    layer_experts: str = field(default="", metadata={
        "help": "per-layer expert counts overriding --experts, as LAYER:EXPERTS pairs, e.g. '0:4,11:16'"})
    attn_rank: int = field(default=16, metadata={"help": "attention LoRA rank (plain LoRA through peft); 0 freezes "
                                                         "attention"})
    attn_alpha: float | None = field(default=None, metadata={"help": "attention LoRA alpha. Unset: 2 × attn_rank"})
    shared_expert_rank: int = field(default=0, metadata={
        "help": "rank of a shared expert: an always-on LoRA on every MoE layer's MLP projections, beside the routed "
                "experts (merged into every expert on export). 0 = none"})
    shared_expert_alpha: float | None = field(default=None, metadata={
        "help": "shared expert LoRA alpha. Unset: 2 × shared_expert_rank"})
    router_init_std: float = field(default=DEFAULT_ROUTER_INIT_STD, metadata={
        "help": "std of the router's random initialisation"})
    train_base: bool = field(default=False, metadata={
        "help": "train the base model's weights too (full fine-tune + adapters, as in the MoE-KD paper); the "
                "trained base is saved with the student (base.safetensors) and merged on export"})
    expert_impl: str = field(default="auto", metadata={
        "help": resumable("how experts are computed: auto (grouped GEMM on CUDA, compiled SwiGLU kernel on CPU, else "
                          "loop), compiled, fused, loop (the autograd reference), grouped", "the same function"),
        "choices": list(EXPERT_IMPLS)})

    def __post_init__(self) -> None:
        for name, rank in (("attn_alpha", "attn_rank"), ("shared_expert_alpha", "shared_expert_rank")):
            if getattr(self, rank) == 0 and getattr(self, name) not in (None, default_alpha(0)):
                raise ValueError(f"--{_flag(name)} is given but --{_flag(rank)} is 0 (no such LoRA): set "
                                 f"--{_flag(rank)}, or drop --{_flag(name)}")
        if self.alpha is None:
            self.alpha = default_alpha(self.rank)
        if self.attn_alpha is None:
            self.attn_alpha = default_alpha(self.attn_rank)
        if self.shared_expert_alpha is None:
            self.shared_expert_alpha = default_alpha(self.shared_expert_rank)
        if self.lora_scaling not in LORA_SCALINGS:
            raise ValueError(f"lora_scaling must be one of {LORA_SCALINGS}, got {self.lora_scaling!r}")
        if self.shared_expert_rank < 0:
            raise ValueError(f"shared_expert_rank must be >= 0 (0 = no shared expert), got {self.shared_expert_rank}")
        if not 1 <= self.experts_per_token <= self.experts:
            raise ValueError(f"experts_per_token must be in [1, experts={self.experts}], got {self.experts_per_token}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.routing == "all" and self.experts_per_token != self.experts:
            raise ValueError(f"--routing all puts every expert on every token: set --experts-per-token to --experts "
                             f"({self.experts}), got {self.experts_per_token}")
        if self.routing != "learned" and self.router_init_std != DEFAULT_ROUTER_INIT_STD:
            raise ValueError(f"--router-init-std is given but --routing {self.routing} has no router: drop it")
        if self.rank < 1 or self.attn_rank < 0:
            raise ValueError(f"rank must be >= 1 and attn_rank >= 0, got {self.rank} and {self.attn_rank}")
        if self.expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {self.expert_impl!r}")
        parse_layer_experts(self.layer_experts)  # a malformed spec fails here, not when the student is built

    def experts_at(self, layer: int) -> int:
        """Experts of MoE layer `layer`: its `layer_experts` override, else `experts`."""
        return parse_layer_experts(self.layer_experts).get(layer, self.experts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """The config saved as `d` (a student.json "config", a train_config.json), old option names included."""
        d = dict(d)
        for old, new in _RENAMED.items():
            if old in d:
                if new in d:
                    raise ValueError(f"config has both {old!r} and its new name {new!r}")
                d[new] = d.pop(old)
        if isinstance(d.get("layer_experts"), dict):
            d["layer_experts"] = format_layer_experts(d["layer_experts"])
        known = {f.name for f in dataclasses.fields(cls)}
        for moved in _TRAINING_ONLY - known:  # a student.json of earlier versions held these training settings
            d.pop(moved, None)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class RouterLossConfig:
    """The auxiliary losses a MoE-LoRA student's routers train with (`student.router_loss.router_losses`): a
    training setting, not part of the student, so both recipes (kdstudent train, KDTrainer) take it."""

    balance_coef: float = field(default=0.01, metadata={
        "help": "load-balancing loss coefficient, in transformers' Mixtral convention (router_aux_loss_coef; the "
                "loss is num_experts × sum_e f_e P_e pooled over MoE layers, = experts_per_token when balanced)"})
    z_coef: float = field(default=0.0, metadata={"help": "router z-loss coefficient"})

    def __post_init__(self) -> None:
        if not (self.balance_coef >= 0 and self.z_coef >= 0):  # also refuses NaN
            raise ValueError(f"balance_coef and z_coef must be >= 0, got {self.balance_coef} and {self.z_coef}")


@dataclass(kw_only=True)
class TrainConfig(MoELoRAConfig, RouterLossConfig):
    """Everything `kdstudent train` takes (as flags, or in a YAML/JSON file): the student's shape (the fields of
    MoELoRAConfig), its routers' losses (RouterLossConfig) and the run's options. Only the shape is saved with
    the student."""

    store: list[str] = field(metadata={
        "help": "logit store to distil from (path or URL); repeat it to train on a mixture, `--store A --store "
                "B:0.3`: a weight after ':' is the store's share of the loss positions (see --mix-by), stores "
                "without one share the rest in proportion to theirs (no weights: every store once per epoch). "
                "Mixed stores need the same tokenizer; their target kinds and k may differ",
        "action": "extend"})
    mix_by: str = field(default="positions", metadata={
        "help": resumable(
            "what a mixture weight is a share of: positions (the loss positions, what the loss averages over: a "
            "prompt-masked store gets its weight of them) or tokens (the rows' tokens, i.e. of the forward compute; "
            "how moekd weighted mixtures before)", "only where no store's rows per epoch change: the reader's "
            "checkpoint refuses the rest, saying why; a weighted run of earlier versions resumes with tokens"),
        "choices": list(MIX_BY)})
    base: str = field(metadata={"help": "dense base model directory the student starts from"})
    out: str = field(metadata={"help": "run directory: checkpoints, metrics.jsonl, final student"})
    student: str = field(default="moe-lora", metadata={
        "help": "student kind: moe-lora (the shape options), lora (dense LoRA on attention and MLP: --rank, --alpha, "
                "--lora-dropout) or full (every parameter); all take --keep-layers",
        "choices": ["moe-lora", "lora", "full"]})
    loss: str = field(default="fkl", metadata={"help": "KD loss on the stored support + tail",
                                               "choices": ["fkl", "rkl", "skl", "srkl", "jsd"]})
    skew_alpha: float = field(default=0.1, metadata={"help": "skew of skl/srkl"})
    jsd_beta: float = field(default=0.5, metadata={"help": "generalised JSD beta"})
    temperature: float = field(default=1.0, metadata={"help": "distillation temperature"})
    kd_weight: float = field(default=1.0, metadata={"help": "weight of the KD loss"})
    ce_weight: float = field(default=0.0, metadata={"help": "weight of cross-entropy on the labels"})
    cross_tokenizer: str | None = field(default=None, metadata={
        "help": "distil a student whose tokenizer is not the store's: the student tokenizes each row's text (read "
                "with the tokenizer the store carries) and KD applies where both tokenizations start their next "
                "token at the same byte; gold: candidates spelled the same in both vocabularies compared by --loss, "
                "the rest by ULD (sorted probabilities); uld: every candidate by ULD. Unaligned positions get the CE "
                "term only (give --ce-weight). Without it another tokenizer is refused (docs/TRAINING.md)",
        "choices": ["gold", "uld"]})
    loss_chunk: int = field(default=1024, metadata={"help": resumable("positions per LM-head chunk")})
    loss_keep_logits: bool = field(default=False, metadata={
        "help": resumable("keep the LM head's logits from the forward for the backward instead of recomputing them: "
                          "one LM-head matmul less per chunk, for positions x vocab floats of memory (0.4 GB at 8 x "
                          "256 positions and vocabulary 49,152); results are bitwise the same")})
    batch_size: int = field(default=8, metadata={"help": "rows per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=100, metadata={"help": resumable(
        "optimizer steps", "not below the step the run has reached; the cosine schedule is then the new length's, "
        "from that step on")})
    lr: float = field(default=2e-4, metadata={"help": resumable(
        "peak learning rate", "the schedule's factors at the steps to come then multiply the new peak")})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps, then cosine decay to 0"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping; 0: off"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast"})
    base_dtype: str = field(default="float32", metadata={
        "help": "dtype the frozen base is loaded in; adapters, routers and LoRA factors stay fp32. bfloat16 halves "
                "the base's memory and, on CUDA, runs the MoE experts as grouped GEMMs (needs --bf16; not with "
                "--student full, which keeps fp32 master weights)", "choices": ["float32", "bfloat16"]})
    sharding: str = field(default="ddp", metadata={
        "help": "under torchrun: ddp (every process holds the whole student) or fsdp (FSDP2: parameters, gradients "
                "and optimizer state sharded over the processes; docs/TRAINING.md)", "choices": ["ddp", "fsdp"]})
    fsdp_frozen: str = field(default="shard", metadata={
        "help": "fsdp: shard the frozen base too (a base larger than one device) or replicate it on every process "
                "(never communicated; only the trainable part is sharded)", "choices": ["shard", "replicate"]})
    fsdp_replicas: int = field(default=1, metadata={
        "help": "fsdp: replica groups of a 2-D (replicate x shard) mesh, i.e. HSDP: shard within groups of "
                "processes/R (a node), replicate across them; 1 = shard over all processes"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": resumable("recompute activations in backward")})
    seed: int = field(default=0, metadata={"help": "seed of student init, data order and dropout"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle the store's rows (seeded, per epoch)"})
    shuffle_buffer: int = field(default=1024, metadata={"help": "rows shuffled together"})
    num_workers: int = field(default=0, metadata={"help": resumable("DataLoader workers per process")})
    log_every: int = field(default=10, metadata={"help": resumable("steps between metrics lines")})
    save_every: int = field(default=0, metadata={"help": resumable("steps between checkpoints; 0: only at the end")})
    keep_checkpoints: int = field(default=2, metadata={"help": resumable("newest checkpoints kept; 0 keeps all")})
    eval_store: str | None = field(default=None, metadata={"help": resumable(
        "held-out store evaluated every eval_every", "later evaluations in metrics.jsonl are then of the new store")})
    eval_every: int = field(default=0, metadata={"help": resumable("steps between evaluations; 0: only at the end")})
    eval_rows: int = field(default=256, metadata={"help": resumable("rows of the eval store used per evaluation")})
    router_bias_update: float = field(default=0.0, metadata={
        "help": "DeepSeek-V3 auxiliary-loss-free balancing: after every optimizer step each MoE layer's per-expert "
                "selection bias moves by this much towards balance (+ for underloaded experts, - for overloaded). "
                "The bias only picks the top-k experts, never weighs them. 0 = off"})
    router_lr_scale: float = field(default=1.0, metadata={
        "help": "the routers' learning rate as a multiple of --lr"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from the trained student of another run (its weights; this run's optimizer, schedule and "
                "data order are fresh): an on-policy round continues the last round's student. The run must have "
                "this run's --student, --base and shape"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the newest checkpoint in --out, with the run's settings: a setting whose help does "
                "not say it may change on --resume is refused if it differs (docs/TRAINING.md, 'What happens "
                "when...')"})
    progress: bool = field(default=True, metadata={"help": resumable("show a progress bar")})
    report_to: str = field(default="none", metadata={
        "help": resumable("also report the metrics to: tensorboard (RUN/tensorboard; needs the tensorboard "
                          "package) or none. metrics.jsonl is always written"), "choices": list(REPORT_TO)})

    def __post_init__(self) -> None:
        """Refuse options that cannot work now, before a model or a store is loaded (a mistake costs seconds)."""
        MoELoRAConfig.__post_init__(self)
        RouterLossConfig.__post_init__(self)
        if isinstance(self.store, str):  # one store, as a config file or an earlier run's config may give it
            self.store = [self.store]
        if not self.store:
            raise ValueError("--store is required: the logit store(s) to distil from")
        self.store_weights()  # a bad weight is refused here
        at_least = {"batch_size": 1, "grad_accum": 1, "max_steps": 1, "log_every": 1, "eval_rows": 1,
                    "shuffle_buffer": 1, "loss_chunk": 1, "warmup_steps": 0, "save_every": 0, "eval_every": 0,
                    "num_workers": 0, "keep_checkpoints": 0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{_flag(name)} must be an integer >= {low}, got {value!r} ({_help(name)})")
        for name, positive in (("lr", True), ("temperature", True), ("weight_decay", False),
                               ("max_grad_norm", False), ("kd_weight", False), ("ce_weight", False),
                               ("router_bias_update", False), ("router_lr_scale", False)):
            value = getattr(self, name)
            if not (value > 0 if positive else value >= 0):  # also refuses NaN
                raise ValueError(f"--{_flag(name)} must be {'>' if positive else '>='} 0, got {value!r} "
                                 f"({_help(name)})")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"--report-to {self.report_to!r}: one of {', '.join(REPORT_TO)}")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
        if self.routing != "learned" and self.student == "moe-lora":  # nothing to balance, no router to train
            given = [f"--{_flag(n)}" for n, default in (("z_coef", 0.0), ("router_bias_update", 0.0),
                                                        ("router_lr_scale", 1.0),
                                                        ("balance_coef", RouterLossConfig.balance_coef))
                     if getattr(self, n) != default]
            if given:
                raise ValueError(f"{', '.join(given)} given, but --routing {self.routing} has no router: drop them "
                                 f"(the balance loss's default {RouterLossConfig.balance_coef} applies to no layer)")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("--kd-weight and --ce-weight are both 0: there is nothing to train on")
        try:
            self.loss_config()  # the loss's own checks
        except ValueError as e:
            raise ValueError(f"loss options (--loss, --skew-alpha, --jsd-beta): {e}") from None

    def store_weights(self) -> tuple[list[str], list[float | None]]:
        """The stores' paths and weights (None where `--store` gives none)."""
        return parse_store_specs(self.store)

    def student_config(self) -> MoELoRAConfig:
        """The student's shape: this config's MoELoRAConfig fields."""
        return MoELoRAConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MoELoRAConfig)})

    def router_loss_config(self) -> RouterLossConfig:
        """The routers' loss coefficients: this config's RouterLossConfig fields."""
        return RouterLossConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RouterLossConfig)})

    def loss_config(self) -> DistillLossConfig:
        return DistillLossConfig(kind=self.loss, alpha=self.skew_alpha, beta=self.jsd_beta,
                                 temperature=self.temperature, kd_weight=self.kd_weight, ce_weight=self.ce_weight,
                                 chunk_size=self.loss_chunk, keep_logits=self.loss_keep_logits, reduction="sum",
                                 cross_tokenizer=self.cross_tokenizer)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _help(name: str) -> str:
    """A field's help without its resume note (error messages quote it)."""
    text = next(f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig) if f.name == name)
    return text.split(f". {RESUME_MAY_CHANGE}")[0]


@dataclass
class StudentSpec:
    """Everything needed to rebuild a student on top of its base; attached to the model as `kd_student`."""

    config: MoELoRAConfig
    moe_layers: list[int]
    base_path: str | None = None
    base_fingerprint: str | None = None
    keep_layers: list[int] | None = None  # layers of the base that were kept, None = all
    model_type: str = ""


def is_moe_student(model: object) -> bool:
    """Whether `model` is a MoE-LoRA student built by student.convert (it carries its StudentSpec)."""
    return isinstance(getattr(model, "kd_student", None), StudentSpec)


def student_spec(model: object) -> StudentSpec:
    """The StudentSpec of a MoE-LoRA student; ValueError for any other model."""
    if not is_moe_student(model):
        raise ValueError("model is not a MoE-LoRA student (no kd_student spec): build it with build_student()")
    return model.kd_student


def parse_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """Layer indices from "all", "none", "top-half", "bottom-half", "every-other", a list "0,2,5",
    ranges "0-3" or a Python slice "::2" / "1::2" / "-4:". "Top" means closer to the output."""
    if spec is None:
        return list(range(num_layers))
    if isinstance(spec, (list, tuple)):
        picked = [int(i) for i in spec]
    else:
        s = str(spec).strip().lower()
        if s in ("all", ""):
            return list(range(num_layers))
        if s == "none":
            return []
        if s == "top-half":
            return list(range(num_layers // 2, num_layers))
        if s == "bottom-half":
            return list(range(num_layers // 2))
        if s == "every-other":
            return list(range(0, num_layers, 2))
        if ":" in s:
            parts = [int(p) if p else None for p in s.split(":")]
            if len(parts) > 3:
                raise ValueError(f"bad layer slice {spec!r}")
            return list(range(num_layers))[slice(*parts)]
        picked = []
        for part in s.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                picked.extend(range(int(lo), int(hi) + 1))
            else:
                picked.append(int(part))
    picked = [i + num_layers if i < 0 else i for i in picked]
    bad = [i for i in picked if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a model with {num_layers} layers (spec {spec!r})")
    return sorted(set(picked))


def parse_layer_experts(spec: str) -> dict[int, int]:
    """'0:4,3:16' -> {0: 4, 3: 16} (the `layer_experts` option)."""
    if not isinstance(spec, str):
        raise TypeError(f"layer_experts is a string of LAYER:EXPERTS pairs such as '0:4,11:16', got {spec!r}")
    out: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        layer, sep, n = part.partition(":")
        try:
            if not sep:
                raise ValueError
            out[int(layer)] = int(n)
        except ValueError:
            raise ValueError(f"layer_experts must look like 'LAYER:EXPERTS,...', got {part!r} in {spec!r}") from None
    return out


def format_layer_experts(counts: dict[int | str, int]) -> str:
    """{0: 4, 3: 16} -> '0:4,3:16' (the inverse of parse_layer_experts)."""
    return ",".join(f"{layer}:{n}" for layer, n in sorted((int(k), int(v)) for k, v in counts.items()))
