"""Model directories: `config.json` + `model.safetensors` holding what the named base models cannot rebuild.

Saved groups: adaptor and speech embeddings always, the layer mix and LoRA when configured, encoder / LLM when
random or trained.
Loading is strict: a missing or unexpected tensor, or a shape mismatch, is an error naming it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from osum import fileio
from osum.config import ModelConfig, from_dict
from osum.model.speech_llm import SpeechLLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def group_of(key: str) -> str:
    if "lora_" in key:
        return "lora"
    return key.split(".", 1)[0]  # encoder | adaptor | layer_mix | summary | speech_embeds | llm


def stored_groups(cfg: ModelConfig) -> list[str]:
    groups = ["adaptor", "speech_embeds"]
    if cfg.adaptor.encoder_layers:
        groups.append("layer_mix")
    if cfg.adaptor.summary_layers:
        groups.append("summary")
    if cfg.lora.enabled:
        groups.append("lora")
    if cfg.encoder.name is None or cfg.encoder.trainable:
        groups.append("encoder")
    if cfg.llm.name is None or cfg.llm.trainable:
        groups.append("llm")
    return groups


def unique_state(model: SpeechLLM, groups: list[str]) -> dict[str, torch.Tensor]:
    """State dict of the given groups with tied tensors (e.g. embed_tokens / lm_head) kept once."""
    seen: set[int] = set()
    state = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if group_of(key) not in groups:
            continue
        ptr = tensor.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        state[key] = tensor
    return state


def save(
    model: SpeechLLM,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    groups: list[str] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model directory atomically (a temp dir renamed into place).

    `groups` overrides which parts are stored (a LoRA-merged export stores the LLM); `state` supplies the
    tensors when the module's own state_dict is sharded (FSDP gathers a full one first).
    """
    with fileio.atomic_dir(out_dir) as tmp:
        write(model, tmp, dtype, groups, state)
    return Path(out_dir)


def write(
    model: SpeechLLM,
    folder: Path,
    dtype: torch.dtype | None = None,
    groups: list[str] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """The files of a model directory, into an existing folder (callers make it atomic)."""
    groups = groups or stored_groups(model.config)
    names = unique_state(model, groups)
    source = state if state is not None else names
    missing = sorted(set(names) - set(source))
    if missing:
        raise KeyError(f"state to save lacks tensors of groups {groups}: {missing[:10]}")
    state = {k: (source[k].detach().to(dtype) if dtype and source[k].is_floating_point() and not _keep_fp32(k)
                 else source[k].detach()).contiguous().cpu() for k in names}
    meta = {"format_version": FORMAT_VERSION, "stored_groups": groups, "model": model.config.to_dict()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")


def _keep_fp32(key: str) -> bool:
    """The voice summary's fitted tag heads and frame locator keep their dtype in a half-precision export: their
    weights hold the fit's standardisation (divided by each statistic's spread), which can exceed fp16's range,
    and they are a few thousand numbers."""
    return key.startswith(("summary.heads.", "summary.locator."))


def read_config(model_dir: str | Path) -> tuple[ModelConfig, list[str]]:
    meta = json.loads((Path(model_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{model_dir}: unsupported osum format_version {meta.get('format_version')!r}")
    return from_dict(ModelConfig, meta["model"]), list(meta["stored_groups"])


def load(model_dir: str | Path, device: str | torch.device = "cpu") -> SpeechLLM:
    model_dir = Path(model_dir)
    cfg, groups = read_config(model_dir)
    if cfg.encoder.name is None and cfg.llm.name is None:
        return _load_whole(model_dir, cfg).to(device).eval()
    model = SpeechLLM(cfg)
    load_weights(model, model_dir, groups)
    return model.to(device).eval()


def _load_whole(model_dir: Path, cfg: ModelConfig) -> SpeechLLM:
    """Every tensor is in the file (e.g. a converted OSUM checkpoint): build without parameters and put the
    file's tensors in their place, so an 8 B model holds one copy of its weights, not a random one as well."""
    from osum.model.lazy import empty_parameters, fill

    with empty_parameters():
        model = SpeechLLM(cfg)
    with safe_open(str(model_dir / WEIGHTS_FILE), framework="pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
    fill(model, state, str(model_dir / WEIGHTS_FILE))
    return model


def canonical(key: str) -> str:
    """A tensor's name with peft's LoRA wrapping taken out, so that a stage trained without LoRA feeds a stage
    with it (and back): `llm.base_model.model.X.q_proj.base_layer.weight` → `llm.X.q_proj.weight`."""
    if key.startswith("llm.base_model.model."):
        key = "llm." + key[len("llm.base_model.model."):]
    return key.replace(".base_layer.", ".")


def load_weights(model: SpeechLLM, model_dir: str | Path, groups: list[str] | None = None) -> list[str]:
    """Copy a model directory's tensors into `model`; the file must hold exactly the groups it declares."""
    model_dir = Path(model_dir)
    if groups is None:
        groups = read_config(model_dir)[1]
    expected = {canonical(k): v for k, v in unique_state(model, groups).items()}
    with safe_open(str(model_dir / WEIGHTS_FILE), framework="pt") as f:
        names = {canonical(k): k for k in f.keys()}
        found = set(names)
        missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
        if missing or unexpected:
            raise KeyError(
                f"{model_dir / WEIGHTS_FILE} does not match its config: "
                f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            )
        with torch.no_grad():
            for key, target in expected.items():
                value = f.get_tensor(names[key])
                if value.shape != target.shape:
                    raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(target.shape)}")
                target.copy_(value.to(target.dtype))
    return groups
