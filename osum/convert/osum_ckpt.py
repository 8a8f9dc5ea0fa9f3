"""OSUM's released checkpoint (`infer.pt`) ⇄ osum models; the same for OSUM-EChat's speech-understanding part.

    osum convert osum-ckpt --checkpoint infer.pt --out models/osum-qwen2-7b   # → an osum model directory
    model = osum.load("infer.pt")                                             # the same, in memory
    osum convert to-osum-ckpt --model models/osum-qwen2-7b --out infer.pt     # back to the reference layout

The reference file is one flat state dict in WeNet + PEFT names. It is memory-mapped and put into a model built
without parameters (`osum.model.lazy`), so tensors already in the right dtype (the bf16 LLM) are used in place.
Every key is either mapped, or one the reference never uses at inference (named in `Layout.ignored`); anything
else, or a key the model needs and the file lacks, is an error that names it.
"""
from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from osum import fileio
from osum import weights
from osum.config import ModelConfig
from osum.model import checkpoint
from osum.model.encoder_weights import WENET_NAMES, WENET_POSITIONS, load_tensor_file, rename
from osum.model.lazy import empty_parameters, fill
from osum.model.llm import DTYPES
from osum.model.speech_llm import SpeechLLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """One reference model family: its preset, what its checkpoint holds that understanding never reads."""

    name: str
    preset: str  # our preset with the reference's architecture, prompt layout and end token
    lora: bool  # whether the reference wraps its LLM in PEFT LoRA
    ignored: tuple[str, ...]  # exact keys or prefixes (ending in ".") that are not part of the understanding model
    unused_heads: tuple[str, ...]  # Linear(H -> speech_token_num) heads written as zeros on export
    prompt_layout: str


OSUM = Layout(
    name="osum",
    preset="osum-compat-qwen2-7b",
    lora=True,
    # Aliases of the LLM's embed_tokens / lm_head (same storage), a LayerNorm declared but never called, and a
    # speaker head never called (fact sheet §1).
    ignored=("embed_tokens.weight", "lm_head.weight", "ln_speech.", "speaker_head."),
    unused_heads=("speaker_head",),
    prompt_layout="osum",
)
ECHAT = Layout(
    name="osum-echat",
    preset="osum-echat-compat-qwen2.5-3b",
    lora=False,
    # As OSUM, plus the speech-output head (the EChat dialogue issue adds it); EChat attaches its speech
    # embedding and head to the LLM at inference, so a checkpoint saved after that also holds aliases there.
    ignored=("embed_tokens.weight", "lm_head.weight", "ln_speech.", "speech_head.",
             "llama_model.speech_token_emded.", "llama_model.speech_head."),
    unused_heads=("speech_head",),
    prompt_layout="chat",
)
LAYOUTS = {layout.name: layout for layout in (OSUM, ECHAT)}

# (reference name, our name) prefix pairs of the adaptor; "{n}" is a layer index.
ADAPTOR_NAMES: list[tuple[str, str]] = [
    # GxlConv1dSubsampling4 is a Sequential (pad, conv, GELU) x 3: its convs sit at indices 1, 4 and 7.
    ("down_sample_2.conv.1.", "adaptor.convs.0."),
    ("down_sample_2.conv.4.", "adaptor.convs.1."),
    ("down_sample_2.conv.7.", "adaptor.convs.2."),
    ("speech_transformer.embed.out.0.", "adaptor.input_proj."),
    ("speech_transformer.embed.out.1.", "adaptor.input_norm."),
    ("speech_transformer.after_norm.", "adaptor.norm."),
    ("speech_transformer.encoders.{n}.self_attn.linear_q.", "adaptor.layers.{n}.q_proj."),
    ("speech_transformer.encoders.{n}.self_attn.linear_k.", "adaptor.layers.{n}.k_proj."),
    ("speech_transformer.encoders.{n}.self_attn.linear_v.", "adaptor.layers.{n}.v_proj."),
    ("speech_transformer.encoders.{n}.self_attn.linear_out.", "adaptor.layers.{n}.out_proj."),
    ("speech_transformer.encoders.{n}.norm1.", "adaptor.layers.{n}.attn_norm."),
    ("speech_transformer.encoders.{n}.feed_forward.w_1.", "adaptor.layers.{n}.fc1."),
    ("speech_transformer.encoders.{n}.feed_forward.w_2.", "adaptor.layers.{n}.fc2."),
    ("speech_transformer.encoders.{n}.norm2.", "adaptor.layers.{n}.ffn_norm."),
    ("speech_llama_proj.", "adaptor.proj."),
]
ADAPTOR_POSITIONS = "speech_transformer.embed.pos_enc.pe"  # (1, T, d) ⇄ adaptor.positions (T, d)
SPEECH_TOKENS = "speech_token_emded.weight"  # (N + 2, H): rows N, N + 1 are speech-begin / speech-end
SPEECH_TOKEN_NUM = 4097  # OSUM's and EChat's N
LLM = "llama_model."
PEFT = "base_model.model."  # PeftModelForCausalLM → LoraModel → the HF causal LM
LORA = re.compile(r"\.(?P<target>\w+)\.lora_[AB]\.")
CHECKPOINT_WRAPPERS = ("module", "state_dict", "model")
OSUM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


# ---- names --------------------------------------------------------------------------------------


def lora_targets(keys) -> list[str]:
    """Module names that carry LoRA weights in a state dict (e.g. q_proj, ..., down_proj)."""
    return sorted({m.group("target") for k in keys for m in [LORA.search(k)] if m})


def _llm_key(rest: str, targets: list[str]) -> str:
    """A reference LLM key (after `llama_model.`) → ours, for either PEFT layout (with or without base_layer.)."""
    hf = rest[len(PEFT):] if rest.startswith(PEFT) else rest
    if not targets:
        return "llm." + hf
    # PEFT < 0.7 stored a wrapped layer's own weight as `q_proj.weight`; newer PEFT as `q_proj.base_layer.weight`.
    m = re.match(r"^(?P<head>.*\.(?P<mod>\w+))\.(?P<leaf>weight|bias)$", hf)
    if m and m.group("mod") in targets:
        hf = f"{m.group('head')}.base_layer.{m.group('leaf')}"
    return "llm." + PEFT + hf


def ours_of(key: str, targets: list[str]) -> str | None:
    """Our name of a reference key (None for keys this module does not map)."""
    if key.startswith("encoder."):
        name = key[len("encoder."):]
        if name == WENET_POSITIONS:
            return "encoder.embed_positions.weight"
        ours = rename(name, WENET_NAMES)
        return None if ours is None else "encoder." + ours
    if key == ADAPTOR_POSITIONS:
        return "adaptor.positions"
    if key == SPEECH_TOKENS:
        return "speech_embeds"
    if key.startswith(LLM):
        return _llm_key(key[len(LLM):], targets)
    return rename(key, ADAPTOR_NAMES)


def reference_of(key: str) -> str:
    """The reference name of one of our keys (PEFT >= 0.7 layout), for export and for error messages."""
    if key == "encoder.embed_positions.weight":
        return "encoder." + WENET_POSITIONS
    if key.startswith("encoder."):
        theirs = rename(key[len("encoder."):], WENET_NAMES, reverse=True)
        if theirs is not None:
            return "encoder." + theirs
    if key == "adaptor.positions":
        return ADAPTOR_POSITIONS
    if key == "speech_embeds":
        return f"{SPEECH_TOKENS} (its last two rows)"
    if key.startswith("llm."):
        return LLM + key[len("llm."):]
    theirs = rename(key, ADAPTOR_NAMES, reverse=True)
    if theirs is None:
        raise KeyError(f"{key} has no name in OSUM's checkpoint layout")
    return theirs


def _is_ignored(key: str, layout: Layout) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in layout.ignored)


# ---- reading ------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat state dict of a reference checkpoint, memory-mapped (weights only: no code runs on load)."""
    data = load_tensor_file(path)
    if isinstance(data, dict) and not all(isinstance(v, torch.Tensor) for v in data.values()):
        # A DeepSpeed or trainer file that was not flattened yet: the state dict sits under one key.
        for wrapper in CHECKPOINT_WRAPPERS:
            if isinstance(data.get(wrapper), dict):
                log.info("%s: state dict found under %r", path, wrapper)
                data = data[wrapper]
                break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: expected a flat {{name: tensor}} state dict (OSUM's infer.pt)")
    return data


def import_state(sd: dict[str, torch.Tensor], layout: Layout) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Reference tensors → (our state, ignored keys by reason); a key neither mapped nor ignored is an error."""
    targets = lora_targets(sd)
    state: dict[str, torch.Tensor] = {}
    ignored: dict[str, list[str]] = {}
    unknown = []
    for key, value in sd.items():
        if _is_ignored(key, layout):
            ignored.setdefault(key.split(".")[0], []).append(key)
            continue
        ours = ours_of(key, targets)
        if ours is None:
            unknown.append(key)
            continue
        if key == SPEECH_TOKENS:
            if value.shape[0] < 2:
                raise ValueError(f"{key} has {value.shape[0]} rows; speech-begin/end are its last two")
            unused = value.shape[0] - 2
            ignored.setdefault(f"{SPEECH_TOKENS} rows 0..{unused - 1} (speech tokens, unused by understanding)", [])
            value = value[-2:]
        elif key in (ADAPTOR_POSITIONS, "encoder." + WENET_POSITIONS):
            value = value.reshape(value.shape[-2], value.shape[-1])
        state[ours] = value
    if unknown:
        raise KeyError(f"{len(unknown)} key(s) of no known {layout.name} module: {unknown[:10]}")
    return state, ignored


# ---- config -------------------------------------------------------------------------------------


def _layers(keys, prefix: str) -> int:
    """Number of layers `prefix{n}.` present, checked to be 0..n-1."""
    found = {int(m.group(1)) for k in keys for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    if found != set(range(len(found))):
        raise KeyError(f"layers under {prefix} are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return len(found)


def _need(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"{source}: missing {reference_of(key)} (needed to read the model's sizes)")
    return state[key]


def llm_sizes_from_hf(source: str) -> dict:
    """LLMConfig fields of a Hugging Face config (local dir or hub id; only config.json is read)."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(weights.resolve(source)).get_text_config()
    if hf.model_type not in ("qwen2", "qwen3", "qwen3_moe"):
        raise ValueError(f"{source}: model_type {hf.model_type!r}; osum builds qwen2, qwen3 and qwen3_moe LLMs")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    if rope.get("rope_type", "default") != "default" or theta is None:
        raise ValueError(f"{source}: rope {rope or 'unset'} is not plain RoPE with a theta (not supported here)")
    if getattr(hf, "use_sliding_window", False):
        raise ValueError(f"{source}: sliding-window attention is not supported here")
    if abs(hf.rms_norm_eps - 1e-6) > 1e-12:
        raise ValueError(f"{source}: rms_norm_eps {hf.rms_norm_eps} differs from the 1e-6 osum builds with")
    sizes = dict(
        arch=hf.model_type,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads,
        head_dim=getattr(hf, "head_dim", None),
        intermediate_size=hf.intermediate_size,
        vocab_size=hf.vocab_size,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        rope_theta=float(theta),
    )
    if hf.model_type == "qwen3_moe":
        sizes.update(num_experts=hf.num_experts, num_experts_per_tok=hf.num_experts_per_tok,
                     moe_intermediate_size=hf.moe_intermediate_size)
    return sizes


def dtype_name(dtype: torch.dtype) -> str:
    """The config name (llm.dtype) of a torch dtype."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"checkpoint LLM tensors are {dtype}; osum runs {', '.join(DTYPES)} (pass dtype=...)")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def checkpoint_config(
    state: dict[str, torch.Tensor],
    base: ModelConfig,
    source: str,
    llm_config: str | None = None,
    tokenizer: str | None = None,
    lora_alpha: int | None = None,
    dtype: str | None = None,
) -> ModelConfig:
    """`base` with every size read off the tensors (sizes not in the shapes come from `base` or `llm_config`)."""
    cfg = copy.deepcopy(base)
    keys = list(state)
    conv1 = _need(state, "encoder.conv1.weight", source)
    cfg.audio.n_mels = conv1.shape[1]
    enc = cfg.encoder
    enc.name = None  # the fine-tuned encoder lives in the checkpoint
    enc.d_model = conv1.shape[0]
    enc.num_layers = _layers(keys, "encoder.layers.")
    enc.ffn_dim = _need(state, "encoder.layers.0.fc1.weight", source).shape[0]
    enc.max_positions = _need(state, "encoder.embed_positions.weight", source).shape[0]

    ada = cfg.adaptor
    ada.d_model = _need(state, "adaptor.input_proj.weight", source).shape[0]
    ada.conv_kernel = _need(state, "adaptor.convs.0.weight", source).shape[2]
    ada.conv_strides = [1, 2, 2]  # fixed by GxlConv1dSubsampling4
    ada.num_layers = _layers(keys, "adaptor.layers.")
    ada.ffn_dim = _need(state, "adaptor.layers.0.fc1.weight", source).shape[0]
    ada.max_positions = _need(state, "adaptor.positions", source).shape[0]
    ada.store_positions = True  # the checkpoint's own (possibly bf16-rounded) table, for exact parity

    targets = lora_targets(keys)
    prefix = "llm." + PEFT if targets else "llm."
    embed = _need(state, prefix + "model.embed_tokens.weight", source)
    llm = cfg.llm
    llm.name = None  # the LLM's weights live in the checkpoint; only its tokenizer is named
    if tokenizer is not None:
        llm.tokenizer = tokenizer
    if llm_config is not None:
        for key, value in llm_sizes_from_hf(llm_config).items():
            setattr(llm, key, value)
    llm.vocab_size, llm.hidden_size = embed.shape
    llm.num_layers = _layers(keys, prefix + "model.layers.")
    if llm.arch != "qwen3_moe":
        llm.intermediate_size = _need(state, prefix + "model.layers.0.mlp.up_proj.weight", source).shape[0]
    head = state.get(prefix + "lm_head.weight")
    llm.tie_word_embeddings = head is None or _same_storage(head, embed)
    head_dim = llm.head_dim or llm.hidden_size // llm.num_heads
    leaf = "base_layer.weight" if "q_proj" in targets else "weight"
    for proj, heads in (("q_proj", llm.num_heads), ("k_proj", llm.num_kv_heads)):
        rows = _need(state, f"{prefix}model.layers.0.self_attn.{proj}.{leaf}", source).shape[0]
        if rows != heads * head_dim:
            raise ValueError(
                f"{source}: {proj} has {rows} outputs but the LLM config says {heads} heads x {head_dim}; "
                "pass the LLM's own config (--llm-config)"
            )
    llm.dtype = dtype or dtype_name(embed.dtype)

    cfg.lora.enabled = bool(targets)
    if targets:
        lora_a = next(v for k, v in state.items() if ".lora_A." in k)
        cfg.lora.r = lora_a.shape[0]
        cfg.lora.target_modules = [t for t in base.lora.target_modules if t in targets] + \
            [t for t in targets if t not in base.lora.target_modules]
        if lora_alpha is not None:
            cfg.lora.alpha = lora_alpha
        log.info("LoRA r %d, alpha %d (scale %.3g) on %s", cfg.lora.r, cfg.lora.alpha,
                 cfg.lora.alpha / cfg.lora.r, ", ".join(cfg.lora.target_modules))
    return cfg


# ---- loading ------------------------------------------------------------------------------------


def _check_keys(model: SpeechLLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Missing / unexpected keys in the reference's names (so users can find them in their file)."""
    entries = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for key, tensor in entries.items():
        groups.setdefault(id(tensor), []).append(key)
    missing = [reference_of(keys[0]) for keys in groups.values() if not any(k in state for k in keys)]
    unexpected = sorted(reference_of(k) for k in set(state) - set(entries))
    if missing or unexpected:
        raise KeyError(
            f"{source}: missing {len(missing)} key(s) {missing[:10]}; unexpected {len(unexpected)} {unexpected[:10]}"
        )


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> SpeechLLM:
    """A SpeechLLM of `cfg` whose tensors are `state` (ours names), built without allocating parameters."""
    with empty_parameters():
        model = SpeechLLM(cfg)
    _check_keys(model, state, source)
    fill(model, state, source)
    return model.eval()


def _prepare(
    path: str | Path,
    layout: str,
    config: str | ModelConfig | None,
    overrides: list[str] | None,
    llm_config: str | None,
    tokenizer: str | None,
    lora_alpha: int | None,
    dtype: str | None,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    lay = LAYOUTS[layout]
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or None to keep the checkpoint's)")
    base = config if isinstance(config, ModelConfig) else ModelConfig.load(config or lay.preset, overrides)
    if base.prompt.layout != lay.prompt_layout:
        raise ValueError(f"{lay.name} checkpoints use prompt layout {lay.prompt_layout!r}, the config has "
                         f"{base.prompt.layout!r}")
    sd = read_checkpoint(path)
    has_lora = bool(lora_targets(sd))
    if lay.lora != has_lora:
        log.warning("%s: %s LoRA weights, unlike released %s checkpoints", path, "has" if has_lora else "has no",
                    lay.name)
    state, ignored = import_state(sd, lay)
    for reason, keys in ignored.items():
        log.info("%s: not used for understanding, skipped: %s %s", path, reason, f"({len(keys)} keys)" if keys else "")
    cfg = checkpoint_config(state, base, str(path), llm_config, tokenizer, lora_alpha, dtype)
    return cfg, state


def load_osum_checkpoint(
    path: str | Path,
    layout: str = "osum",
    config: str | ModelConfig | None = None,
    overrides: list[str] | None = None,
    llm_config: str | None = None,
    tokenizer: str | None = None,
    lora_alpha: int | None = None,
    dtype: str | None = None,
    device: str | torch.device = "cpu",
) -> SpeechLLM:
    """A reference checkpoint as a ready SpeechLLM, memory-mapped (the LLM stays in the file's dtype).

    `config`: preset or file whose sizes the shapes do not tell (heads, RoPE, prompt layout; default: the
    layout's compat preset); `llm_config`: an HF config dir or hub id for the LLM's instead; `tokenizer`: a
    tokenizer name or dir (default: the preset's); `dtype`: the LLM's dtype (default: the checkpoint's).
    """
    cfg, state = _prepare(path, layout, config, overrides, llm_config, tokenizer, lora_alpha, dtype)
    return build_model(cfg, state, str(path)).to(device)


def convert_osum_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    layout: str = "osum",
    config: str | ModelConfig | None = None,
    overrides: list[str] | None = None,
    llm_config: str | None = None,
    tokenizer: str | None = None,
    lora_alpha: int | None = None,
    dtype: str | None = None,
) -> Path:
    """Write a reference checkpoint as an osum model directory (tensors in the file's dtypes unless `dtype`)."""
    cfg, state = _prepare(path, layout, config, overrides, llm_config, tokenizer, lora_alpha, dtype)
    model = build_model(cfg, state, str(path))
    # Save the file's own tensors (not the fp32 encoder copies) so bf16 stays bf16 on disk, losslessly.
    names = checkpoint.unique_state(model, checkpoint.stored_groups(cfg))
    source = {k: state[k] for k in names}
    return checkpoint.save(model, out_dir, dtype=DTYPES[dtype] if dtype else None, state=source)


# ---- export -------------------------------------------------------------------------------------


def iter_llm_tensors(model: SpeechLLM) -> Iterator[tuple[str, torch.Tensor]]:
    """The LLM's tensors in plain HF names, LoRA folded in one matrix at a time: W + (alpha / r) * B @ A.

    The sum is taken in fp32 and cast back to W's dtype; biases are unchanged (peft bias='none').
    """
    state = {k[len("llm."):]: v for k, v in model.state_dict().items() if k.startswith("llm.")}
    if not model.config.lora.enabled:
        yield from state.items()
        return
    scale = model.config.lora.alpha / model.config.lora.r
    for key, value in state.items():
        key = key[len(PEFT):] if key.startswith(PEFT) else key
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            head, leaf = key.split(".base_layer.")
            if leaf == "weight":
                a, b = state[f"{PEFT}{head}.lora_A.default.weight"], state[f"{PEFT}{head}.lora_B.default.weight"]
                value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
            key = f"{head}.{leaf}"
        yield key, value


def merged_llm_state(model: SpeechLLM) -> dict[str, torch.Tensor]:
    return dict(iter_llm_tensors(model))


def _zero_lora(llm: dict[str, torch.Tensor], targets: list[str], r: int) -> dict[str, torch.Tensor]:
    """HF-named LLM tensors in the PEFT layout with zero adapters (B = 0: the reference adds nothing)."""
    out = {}
    for key, value in llm.items():
        m = re.match(r"^(?P<head>.*\.(?P<mod>\w+))\.(?P<leaf>weight|bias)$", key)
        if m and m.group("mod") in targets and "layers." in key:
            head = m.group("head")
            out[f"{PEFT}{head}.base_layer.{m.group('leaf')}"] = value
            if m.group("leaf") == "weight":
                out[f"{PEFT}{head}.lora_A.default.weight"] = value.new_zeros(r, value.shape[1])
                out[f"{PEFT}{head}.lora_B.default.weight"] = value.new_zeros(value.shape[0], r)
        else:
            out[PEFT + key] = value
    return out


def export_osum_ckpt(
    model: SpeechLLM,
    out_path: str | Path,
    layout: str = "osum",
    dtype: torch.dtype | None = None,
    speech_token_num: int = SPEECH_TOKEN_NUM,
) -> Path:
    """Write `model` as the reference's flat state dict (what OSUM's or EChat's `load_checkpoint` reads).

    Every key the reference model has is written: the alias keys share storage with the LLM's tensors, parts
    osum has no use for are neutral (LayerNorm 1/0, zero heads, zero speech-token rows). The OSUM layout keeps
    LoRA unmerged (a model without LoRA gets zero adapters, r 8); the EChat layout has none, so LoRA is merged.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    lay, cfg = LAYOUTS[layout], model.config
    if cfg.prompt.layout != lay.prompt_layout:
        raise ValueError(f"the {lay.name} reference uses prompt layout {lay.prompt_layout!r}; this model uses "
                         f"{cfg.prompt.layout!r}, which the reference code cannot reproduce")
    if list(cfg.adaptor.conv_strides) != [1, 2, 2] or cfg.adaptor.conv_kernel != 3:
        raise ValueError(f"the reference downsampler is kernel 3, strides [1, 2, 2]; this model has kernel "
                         f"{cfg.adaptor.conv_kernel}, strides {cfg.adaptor.conv_strides}")
    if cfg.adaptor.encoder_layers:
        raise ValueError(f"adaptor.encoder_layers {cfg.adaptor.encoder_layers}: the reference adaptor reads the "
                         "encoder's top output alone and has no place for the layer mix")
    if cfg.adaptor.summary_layers:
        raise ValueError(f"adaptor.summary_layers {cfg.adaptor.summary_layers}: the reference model has no "
                         "voice summary position before the audio")
    if lay.lora and cfg.lora.enabled and (cfg.lora.r, cfg.lora.alpha) != (8, 32):
        log.warning("LoRA r %d, alpha %d: the reference config must say lora_rank %d, lora_alpha %d to load this",
                    cfg.lora.r, cfg.lora.alpha, cfg.lora.r, cfg.lora.alpha)

    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in own.items():
        if key.startswith(("encoder.", "adaptor.")) and key != "adaptor.positions":
            out[reference_of(key)] = value
    out["encoder." + WENET_POSITIONS] = model.encoder.embed_positions.weight.detach()[None]
    out[ADAPTOR_POSITIONS] = model.adaptor.positions[None]

    if lay.lora and cfg.lora.enabled:
        llm = {k[len("llm."):]: v for k, v in own.items() if k.startswith("llm.")}
    elif lay.lora:
        llm = _zero_lora(merged_llm_state(model), OSUM_LORA_TARGETS, r=8)
    else:
        llm = merged_llm_state(model)
    llm = {LLM + k: v for k, v in llm.items()}
    embed_key = next(k for k in llm if k.endswith("model.embed_tokens.weight"))
    head_key = embed_key.replace("model.embed_tokens.weight", "lm_head.weight")
    if head_key not in llm:  # tied: HF lists lm_head in its state dict, the same tensor
        llm[head_key] = llm[embed_key]
    out.update(llm)

    hidden = llm[embed_key].shape[1]
    enc_dim = model.encoder.conv1.weight.shape[0]
    speech = own["speech_embeds"].new_zeros(speech_token_num + 2, hidden)
    speech[-2:] = own["speech_embeds"]
    extras = {
        "embed_tokens.weight": llm[embed_key],
        "lm_head.weight": llm[head_key],
        SPEECH_TOKENS: speech,
        "ln_speech.weight": torch.ones(enc_dim),
        "ln_speech.bias": torch.zeros(enc_dim),
    }
    for head in lay.unused_heads:
        extras[f"{head}.weight"] = torch.zeros(speech_token_num, hidden)
        extras[f"{head}.bias"] = torch.zeros(speech_token_num)
    out.update(extras)

    order = ("encoder.", "ln_speech.", "speech_transformer.", LLM, "down_sample_2.", "speech_llama_proj.",
             "embed_tokens.", "lm_head.", "speech_token_emded.", "speaker_head.", "speech_head.")
    out = dict(sorted(out.items(), key=lambda kv: next(i for i, p in enumerate(order) if kv[0].startswith(p))))
    cast: dict[tuple, torch.Tensor] = {}  # one cast per tensor, so aliases keep sharing storage on disk
    final = {}
    for key, value in out.items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            ident = (value.data_ptr(), tuple(value.shape), value.stride())
            if ident not in cast:
                cast[ident] = value.to(dtype)
            value = cast[ident]
        final[key] = value
    return _save_atomic(final, Path(out_path))


def _save_atomic(state: dict[str, torch.Tensor], path: Path) -> Path:
    with fileio.atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path
