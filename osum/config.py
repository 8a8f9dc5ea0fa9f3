"""Every osum setting as typed dataclasses, with YAML load/save and dotted overrides.

This module is the only home of settings; paths come from here or from `OSUM_HOME`.
`ModelConfig.load("tiny")` reads a preset from `osum/configs/`, `ModelConfig.load(path)` a YAML or JSON file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "configs"


def osum_home() -> Path:
    """Cache directory for converted base weights: `$OSUM_HOME`, default `~/.cache/osum`."""
    return Path(os.environ.get("OSUM_HOME", Path.home() / ".cache" / "osum")).expanduser()


# Trained models released with osum, by name: `osum.load(name)` finds their directory (config.json +
# safetensors of what was trained; the base models are referenced by name) in the first of these roots.
RELEASED_MODELS = ("osum-tiny",)


def released_roots() -> list[Path]:
    """`$OSUM_HOME/released/`, then the `models/` folder of the osum checkout this package runs from."""
    return [osum_home() / "released", Path(__file__).resolve().parent.parent / "models"]


@dataclass
class AudioConfig:
    sample_rate: int = 16000
    n_mels: int = 80
    # Longest audio the encoder sees in one pass; longer inputs are split at quiet points, never cut.
    max_seconds: float = 30.0


@dataclass
class EncoderConfig:
    """Whisper encoder. `name` loads pretrained weights (named model, HF id or dir); None = random from sizes."""

    name: str | None = None
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 256
    max_positions: int = 1500
    trainable: bool = False
    gradient_checkpointing: bool = False


@dataclass
class AdaptorConfig:
    """Conv downsampler + pre-LN transformer + projection to the LLM width (DESIGN.md §1)."""

    d_model: int = 1024
    conv_kernel: int = 3
    conv_strides: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: int = 2560
    dropout: float = 0.1
    max_positions: int = 5000
    # Lower encoder blocks (0 = the first) whose outputs join the top one's at the adaptor's input, each through
    # its own projection (osum/model/adaptor.py LayerMix). Whisper's top block keeps what transcripts need and
    # drops much of the voice; pooled linear probes on whisper-base find gender in blocks 0-2 of unseen voices
    # nearly always, in the top output four times in five. [] = the top output alone (Whisper, OSUM).
    encoder_layers: list[int] = field(default_factory=list)
    # Encoder blocks whose mean and spread over the utterance make one extra LLM position before the audio
    # (osum/model/adaptor.py VoiceSummary): gender or age belong to the whole utterance, and frame by frame the
    # LLM must learn to pool them itself from one tag token's gradient. [] = no such position (Whisper, OSUM).
    summary_layers: list[int] = field(default_factory=list)
    # Tag fields with a linear head over the voice summary's pooled statistics, fitted after training
    # (`osum export --fit-tag-heads`, osum/model/tag_heads.py); `generation.summary_tags` then reads those
    # fields off their head instead of the summary position's own scores. Set by the export, not by hand.
    tag_heads: list[str] = field(default_factory=list)
    # A frame locator for one tag field whose evidence is a short sound inside speech (the vocal event): a linear
    # scorer over the normalised frames of one summary block, fitted on the training rows' spans of that sound
    # (`osum export --locate-tag-head`, osum/model/tag_heads.py). That field's head then reads statistics pooled
    # with the locator's probabilities as frame weights, so the sound's frames count and the speech around it
    # hardly does. Set by the export, not by hand; both or neither.
    located_head: str | None = None
    locator_layer: int | None = None
    # With a locator: the located head reads a crop instead of the whole utterance, the locator block's frames
    # within this many frames (20 ms each) of its highest-scoring frame, with every later encoder block run again
    # on that crop alone, so the speech around the sound no longer reaches them; its statistics are those of the
    # locator's block and each later one (`osum export --locator-crop`). None = the whole utterance.
    locator_crop: int | None = None
    # Keep the position table in the checkpoint instead of recomputing it: OSUM's infer.pt stores it
    # bf16-rounded, and exact parity needs those values.
    store_positions: bool = False
    trainable: bool = True


@dataclass
class LLMConfig:
    """Any HF causal LM. `name` loads pretrained weights; None = random from `arch` and the sizes below."""

    name: str | None = None
    tokenizer: str | None = None  # defaults to `name`
    arch: str = "qwen2"  # for random init: qwen2 | qwen3 | qwen3_moe
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    intermediate_size: int = 128
    vocab_size: int | None = None  # None = the tokenizer's length
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0
    initializer_range: float = 0.02  # std of random init (tiny test backbones use more so outputs vary)
    num_experts: int = 4  # qwen3_moe only
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    dtype: str = "float32"  # weights of the LLM: float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"
    trainable: bool = False  # full fine-tuning of the LLM (LoRA is separate)
    gradient_checkpointing: bool = False


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    # Names that match no module (e.g. gate/down inside fused MoE experts) are reported and skipped.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    )


@dataclass
class PromptConfig:
    # osum: [prompt][speech-begin][audio][speech-end][target][eos], no template (the paper's layout).
    # chat: the LLM's chat template; prompt and audio sit in the user turn, the target is the reply.
    layout: str = "osum"
    lang: str = "en"  # language of the fixed inference prompts
    system: str | None = None  # chat layout's system prompt; None = tasks.CHAT_SYSTEM_PROMPT
    # Token ending every target; None = the tokenizer's eos (osum) or the template's end of turn (chat).
    # OSUM checkpoints end with <|endoftext|> even when the tokenizer's eos is <|im_end|> (Qwen2-Instruct).
    end_token: str | None = None


# The joint decoding weights `osum export --fit-ctc-weight` tries by default (ESPnet's recipes use 0.1-0.5; a
# small LLM that has heard little real speech can want more: osum-tiny's valid WER was lowest at 0.5, and still
# falling there on a grid that stopped at 0.5). 0, the LLM alone, is always among them.
CTC_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 200
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    seed: int | None = None
    # Extra tokens that end generation, besides the layout's end token and the tokenizer's eos.
    stop_tokens: list[str] = field(default_factory=list)
    # A guard against loops, as openai/whisper's: an output whose text compresses (zlib) by more than this ratio
    # ("a kind of a kind of ...") is decoded again with each repetition penalty below in turn until one stays
    # under it; the least repetitive try is kept. Offline batches only (osum infer/eval, Engine): a stream is
    # already sent. None = off. Greedy outputs of normal speech stay under 2; the loops seen reach 5-10.
    compression_ratio_threshold: float | None = 2.4
    fallback_repetition_penalties: list[float] = field(default_factory=lambda: [1.1, 1.3])
    # Tag fields (gender, age, ...) whose label comes from the voice summary position's own scores rather than
    # from the LLM's text, for a model trained with summary_weight (SpeechLLM.summary_labels); the `raw` output
    # keeps what the LLM wrote. Engine (osum infer/eval) and osum serve. [] = every tag from the LLM.
    summary_tags: list[str] = field(default_factory=list)
    # Where srwt's word times come from: "llm", the spans the LLM writes; or "ctc", for a model trained with
    # ctc_weight > 0: the LLM writes the words and a forced alignment of them to the adaptor's CTC scores gives
    # each one's span (SpeechLLM.word_times), shifted by ctc_time_offsets (seconds, [start, end]), which
    # `osum export --fit-word-times` measures on labelled data. The `raw` output keeps what the LLM wrote.
    word_times: str = "llm"
    ctc_time_offsets: list[float] = field(default_factory=lambda: [0.0, 0.0])
    # Joint CTC/LLM decoding of transcripts, for a model trained with ctc_weight > 0: each of the LLM's top
    # ctc_candidates next tokens is scored (1 - w) * its LLM log-probability + w * its CTC prefix score's increase
    # (osum.model.ctc_prefix), which holds the transcript to what the audio spells. It covers the transcript that
    # opens asr, asr+tags and sttc outputs, up to the first tag or answer; the rest, srwt and free instructions
    # are the LLM's alone. 0 = the LLM alone; `osum export --fit-ctc-weight` chooses w on held-out data.
    ctc_weight: float = 0.0
    ctc_candidates: int = 10
    # Hold what follows a transcript (an only-X output: all of it) to the task's grammar (tasks.tag_grammar): its
    # tags in order, each one of its field's labels, then the end; sttc's answer separator, then the free reply;
    # plain asr's, nothing: its output ends with its transcript.
    # The LLM's scores choose among what the grammar allows, so every such output parses. False: the LLM alone.
    constrain_tags: bool = True

    def __post_init__(self):
        from osum.tasks import TAG_FIELDS  # a leaf module; imported here to keep config's imports plain

        unknown = [f for f in self.summary_tags if f not in TAG_FIELDS]
        if unknown:
            raise ValueError(f"generation.summary_tags {unknown}: not tag fields ({', '.join(TAG_FIELDS)})")
        if self.compression_ratio_threshold is not None and self.compression_ratio_threshold <= 0:
            raise ValueError(f"generation.compression_ratio_threshold must be positive or null, "
                             f"got {self.compression_ratio_threshold}")
        if self.word_times not in ("llm", "ctc"):
            raise ValueError(f"generation.word_times must be 'llm' or 'ctc', got {self.word_times!r}")
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise ValueError(f"generation.ctc_weight must be in [0, 1], got {self.ctc_weight}")
        if self.ctc_candidates < 1:
            raise ValueError(f"generation.ctc_candidates must be at least 1, got {self.ctc_candidates}")
        if len(self.ctc_time_offsets) != 2:
            raise ValueError(f"generation.ctc_time_offsets is [start, end] in seconds, got {self.ctc_time_offsets}")
        if any(p <= 0 for p in self.fallback_repetition_penalties):
            raise ValueError(f"generation.fallback_repetition_penalties must be positive, "
                             f"got {self.fallback_repetition_penalties}")


@dataclass
class ServeConfig:
    """`osum serve`: where to listen, who may call, and the limit every request is held to."""

    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8000
    api_key: str | None = None  # when set, every route but /health needs it (Bearer token, or Basic password)
    model_id: str | None = None  # the name /v1/models lists and requests use; None = the model config's name
    max_upload_bytes: int = 25 * 1024 * 1024  # audio bytes per request, enforced before the body is read
    max_audio_seconds: float = 1800.0  # decoded duration, checked from the file header before decoding
    max_new_tokens: int | None = None  # ceiling per ≤ 30 s piece; None = the model's generation.max_new_tokens
    max_batch_size: int = 16  # pieces merged into one batched generate
    max_wait_ms: float = 10.0  # how long the first waiting piece holds a batch open for more
    queue_size: int = 64  # requests admitted (waiting or running); one more is answered 429
    request_timeout: float = 600.0  # seconds from arrival to the last byte; beyond it 504 and the work is cancelled


@dataclass
class DatasetConfig:
    """One dataset of a mixture. `shards`: a shard-list file, a directory, a glob, a .tar or a JSONL list."""

    name: str = ""
    shards: str = ""
    weight: float = 1.0  # share of the training draws (weights are normalised over the mixture)
    # A task spec forced on every sample (e.g. "asr"); None = each sample's own; "auto" = ignore the sample's own
    # and draw one from its labels (osum/data/targets.py), so a corpus whose tasks follow its audio (synthetic
    # families) also teaches the model to follow the prompt. Listing the same shards twice, once as they are and
    # once with "auto", keeps plain ASR in the mix.
    task: str | None = None


@dataclass
class DataConfig:
    """Every data-pipeline setting (osum/data/). Mixing, epochs and drop reasons: see osum/data/mixture.py."""

    train: list[DatasetConfig] = field(default_factory=list)
    valid: list[DatasetConfig] = field(default_factory=list)
    mixture: str | None = None  # YAML with `train:` / `valid:` mappings of name -> {shards, weight, task}
    # None: a training epoch ends when the first dataset runs out (no sample repeats within an epoch);
    # a number: exactly that many draws over all ranks, datasets restart (reshuffled) when they run out.
    epoch_samples: int | None = None
    # ASR+X targets (osum/data/targets.py)
    only_x_share: float = 0.0  # share of tagged samples trained without the transcript (`only:ser`)
    combined_share: float = 0.0  # share trained on every label the sample has (`asr+ser+sap+sgc`)
    prompt_lang: str | None = None  # en | zh | None = a random language per sample
    time_resolution: float = 0.01  # seconds; srwt spans are quantised to it
    # filters: every dropped sample is counted by reason
    min_seconds: float = 0.1
    max_seconds: float = 30.0  # one encoder pass; longer audio is dropped, never cut
    max_target_tokens: int = 512  # target tokens + end token
    max_sequence_length: int = 1024  # prompt + speech begin/end (+ summary) + audio positions (model strides) + target
    # augmentation (training split only)
    speed_perturb: list[float] = field(default_factory=list)  # e.g. [0.9, 1.0, 1.1]; empty = off
    noise_dir: str | None = None  # folder of wavs mixed in at a random SNR
    noise_prob: float = 0.5
    noise_snr_db: list[float] = field(default_factory=lambda: [5.0, 20.0])  # [low, high]
    spec_augment: bool = False
    freq_masks: int = 2
    freq_mask_width: int = 10  # mel bins, at most
    time_masks: int = 2
    time_mask_width: int = 50  # frames (10 ms), at most
    # buffers and batches
    shuffle_buffer: int = 1000  # samples (training only)
    sort_buffer: int = 200  # samples sorted by length before batching; 0 or 1 = off
    max_batch_frames: int = 12000  # batch size x longest mel frames (100/s)
    max_batch_tokens: int = 16384  # batch size x longest LLM sequence
    max_batch_size: int = 32
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("only_x_share", "combined_share", "noise_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.only_x_share + self.combined_share > 1.0:
            raise ValueError(f"data.only_x_share ({self.only_x_share}) + data.combined_share "
                             f"({self.combined_share}) must not exceed 1")
        if self.prompt_lang not in (None, "en", "zh"):
            raise ValueError(f"data.prompt_lang must be en, zh or null (random), got {self.prompt_lang!r}")
        if not 0 <= self.min_seconds < self.max_seconds:
            raise ValueError(f"data.min_seconds ({self.min_seconds}) must be >= 0 and below "
                             f"data.max_seconds ({self.max_seconds})")
        if any(s <= 0 for s in self.speed_perturb):
            raise ValueError(f"data.speed_perturb factors must be positive, got {self.speed_perturb}")
        if len(self.noise_snr_db) != 2 or self.noise_snr_db[0] > self.noise_snr_db[1]:
            raise ValueError(f"data.noise_snr_db must be [low, high], got {self.noise_snr_db}")
        if self.epoch_samples is not None and self.epoch_samples <= 0:
            raise ValueError(f"data.epoch_samples must be positive or null, got {self.epoch_samples}")
        for name in ("max_batch_size", "max_batch_frames", "max_batch_tokens", "max_target_tokens",
                     "max_sequence_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        # A sample that passes the filters must fit in a batch of its own.
        longest = int(self.max_seconds * 100)
        if self.max_batch_frames < longest:
            raise ValueError(f"data.max_batch_frames ({self.max_batch_frames}) is below the frames of the longest "
                             f"allowed sample (data.max_seconds {self.max_seconds} s = {longest} frames)")
        if self.max_batch_tokens < self.max_sequence_length:
            raise ValueError(f"data.max_batch_tokens ({self.max_batch_tokens}) is below "
                             f"data.max_sequence_length ({self.max_sequence_length})")


@dataclass
class ModelConfig:
    name: str = "custom"
    audio: AudioConfig = field(default_factory=AudioConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adaptor: AdaptorConfig = field(default_factory=AdaptorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    seed: int = 0  # for random initialisation of everything not loaded from a base model

    @classmethod
    def load(cls, name_or_path: str | Path, overrides: list[str] | None = None) -> "ModelConfig":
        return load(cls, name_or_path, overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        save(self, path)


@dataclass
class OptimConfig:
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-6
    weight_decay: float = 0.01  # applied to matrices only, not to biases, norms and embeddings rows
    schedule: str = "inverse_sqrt"  # inverse_sqrt (the paper) | cosine | constant; all with linear warm-up
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.0  # cosine floor, as a share of lr
    grad_clip: float = 5.0
    accum_steps: int = 1


@dataclass
class TrainConfig:
    """`osum train --config FILE.yaml`: `model` is a preset name or a mapping (`preset:` + overrides)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    init_from: str | None = None  # an osum model directory (e.g. the previous stage's export) to start from
    # Weight of the adaptor's CTC loss against the transcript (SpeechLLM.ctc_loss), added to the LLM's loss;
    # 0 = off (the paper). It aligns the adaptor with a frozen LLM in far fewer steps.
    ctc_weight: float = 0.0
    # Weight of the LLM's loss. 0 with ctc_weight > 0 is a CTC-only warm-up of the adaptor: training steps skip
    # the LLM (several times faster a step); validation still scores the LLM's loss.
    lm_weight: float = 1.0
    # Weight of the voice summary's loss (model.adaptor.summary_layers; SpeechLLM.summary_loss): the summary
    # position is pushed towards the LLM's embeddings of the sample's tags. 0 = off.
    summary_weight: float = 0.0
    out_dir: str = "exp/run"
    max_steps: int = 1000
    # fp32 | bf16 | fp16 (fp16 only on CUDA, with loss scaling) | auto: bf16 where the GPU or CPU computes in it
    # natively, else fp16 on a GPU and fp32 on a CPU (osum.train.loop.resolve_precision)
    precision: str = "fp32"
    engine: str = "auto"  # auto (ddp under torchrun, else single) | single | ddp | fsdp2 | deepspeed
    deepspeed_stage: int = 2
    device: str = "auto"  # auto = cuda when available
    log_every: int = 10
    valid_every: int = 0  # steps; 0 = only at the end
    save_every: int = 500
    keep_last: int = 3
    tensorboard: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.summary_weight < 0:
            raise ValueError(f"summary_weight must be >= 0, got {self.summary_weight}")
        if self.summary_weight > 0 and not self.model.adaptor.summary_layers:
            raise ValueError("summary_weight > 0 needs a voice summary: set model.adaptor.summary_layers")
        if self.ctc_weight < 0 or self.lm_weight < 0:
            raise ValueError(f"ctc_weight and lm_weight must be >= 0, got {self.ctc_weight} and {self.lm_weight}")
        if self.ctc_weight == 0 and self.lm_weight == 0:
            raise ValueError("ctc_weight and lm_weight are both 0: nothing to train on")
        if self.lm_weight == 0 and (self.model.lora.enabled or self.model.llm.trainable):
            raise ValueError("lm_weight 0 (a CTC-only warm-up) never runs the LLM: disable lora and llm.trainable")


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training YAML; `model: tiny` or `model: {preset: tiny, adaptor: {...}}` starts from a preset."""
    data = read_mapping(path)
    overrides = list(overrides or [])
    model = data.get("model", {})
    if isinstance(model, str):
        model = {"preset": model}
    # `model.preset=NAME` swaps the base preset itself (e.g. a recipe run at test scale with `tiny`).
    for item in [o for o in overrides if o.split("=", 1)[0].strip() == "model.preset"]:
        model = {**(model if isinstance(model, dict) else {}), "preset": item.split("=", 1)[1].strip()}
        overrides.remove(item)
    if isinstance(model, dict) and "preset" in model:
        base = read_mapping(model["preset"])
        data["model"] = _deep_merge(base, {k: v for k, v in model.items() if k != "preset"})
    data = apply_overrides(data, overrides)
    if not data.get("data", {}).get("train") and not data.get("data", {}).get("mixture"):
        raise ValueError(f"{path}: a training config needs data.train (datasets) or data.mixture (a YAML)")
    return from_dict(TrainConfig, data)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# `--decoding` presets, each a change to the model's own decoding settings (its config's `generation`).
GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    # The model's settings as they are: a released model's config holds those its card measured best.
    "model": {},
    "greedy": dict(num_beams=1, do_sample=False),
    "beam": dict(num_beams=4, do_sample=False),
    # The reference OSUM decoder: stochastic beam sampling.
    "osum": dict(num_beams=4, do_sample=True, top_p=0.9, top_k=5, temperature=1.0, repetition_penalty=1.05),
}


# ---- generic (de)serialisation -------------------------------------------------------------

T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a nested dict; an unknown key is an error naming its dotted path."""
    if not isinstance(data, dict):
        raise ValueError(f"config {where or 'root'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        keys = ", ".join(f"{where}{k}" for k in unknown)
        raise ValueError(f"unknown config key(s): {keys}; valid here: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, where) for v in value]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ValueError(f"config {where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"config {where}: expected a number, got {value!r}")
        try:
            coerced = tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"config {where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != coerced:
            raise ValueError(f"config {where}: expected an integer, got {value!r}")
        return coerced
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config {where}: expected a string, got {value!r}")
        return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings (value parsed as YAML) to a nested dict; validation happens in from_dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def read_mapping(name_or_path: str | Path) -> dict[str, Any]:
    """Read a preset name (`tiny`) or a YAML/JSON file into a dict."""
    path = Path(name_or_path)
    if not path.is_file():
        preset = PRESET_DIR / f"{name_or_path}.yaml"
        if not preset.is_file():
            raise FileNotFoundError(
                f"no config file {str(name_or_path)!r} and no preset of that name; presets: {', '.join(presets())}"
            )
        path = preset
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return data or {}


def load(cls: type[T], name_or_path: str | Path, overrides: list[str] | None = None) -> T:
    return from_dict(cls, apply_overrides(read_mapping(name_or_path), overrides or []))


def save(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    data = dataclasses.asdict(cfg)
    text = json.dumps(data, indent=2, ensure_ascii=False) if path.suffix == ".json" else yaml.safe_dump(
        data, sort_keys=False, allow_unicode=True
    )
    from osum import fileio

    fileio.write_text(path, text)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
