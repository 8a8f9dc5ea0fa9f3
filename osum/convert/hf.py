"""An osum model as an HF-style directory: each part loadable by transformers on its own, LoRA merged.

    out/osum_hf.json               osum's config (encoder.name = "encoder", llm.name = "llm") and format version
    out/speech_adaptor.safetensors the adaptor and the speech-begin/end embeddings (osum's own modules)
    out/encoder/                   WhisperEncoder.from_pretrained(out/encoder) (+ preprocessor_config.json)
    out/llm/                       AutoModelForCausalLM / AutoTokenizer.from_pretrained(out/llm)

`osum.load(out)` reads it back (`load_hf_export`).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from osum import fileio
from osum.config import ModelConfig, from_dict
from osum.convert.osum_ckpt import dtype_name, iter_llm_tensors
from osum.model.speech_llm import SpeechLLM

MARKER = "osum_hf.json"
ADAPTOR_FILE = "speech_adaptor.safetensors"
FORMAT = "osum-hf"
FORMAT_VERSION = 1
SHARD_BYTES = 4 * 2**30


def _save_sharded(tensors, out_dir: Path, dtype: torch.dtype | None, skip: set[str]) -> None:
    """HF's sharded safetensors layout, written shard by shard (one shard in memory at a time)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush(final: bool) -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], str(out_dir / name), metadata={"format": "pt"})
        files.append(name)
        for key in shards[-1]:
            weight_map[key] = name
        if not final:
            shards.append({})

    for key, value in tensors:
        if key in skip:
            continue
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            flush(final=False)
            size = 0
        shards[-1][key] = value.contiguous()
        size += nbytes
        total += nbytes
    flush(final=True)
    if len(files) == 1:
        os.replace(out_dir / files[0], out_dir / "model.safetensors")
        return
    names = {old: f"model-{i:05d}-of-{len(files):05d}.safetensors" for i, old in enumerate(files, 1)}
    for old, new in names.items():
        os.replace(out_dir / old, out_dir / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _export_encoder(model: SpeechLLM, out_dir: Path, dtype: torch.dtype | None) -> None:
    from transformers import WhisperConfig, WhisperFeatureExtractor

    enc, cfg = model.encoder, model.config
    out_dir.mkdir()
    hf = WhisperConfig(
        d_model=cfg.encoder.d_model,
        encoder_layers=cfg.encoder.num_layers,
        encoder_attention_heads=cfg.encoder.num_heads,
        encoder_ffn_dim=cfg.encoder.ffn_dim,
        max_source_positions=cfg.encoder.max_positions,
        num_mel_bins=cfg.audio.n_mels,
    )
    hf.architectures = ["WhisperEncoder"]
    hf.save_pretrained(out_dir)
    state = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in enc.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    WhisperFeatureExtractor(feature_size=cfg.audio.n_mels).save_pretrained(out_dir)


def _export_llm(model: SpeechLLM, out_dir: Path, dtype: torch.dtype | None) -> None:
    base = model.base_llm
    out_dir.mkdir()
    hf = copy.deepcopy(base.config)
    hf.architectures = [type(base).__name__]
    hf.dtype = dtype or base.get_input_embeddings().weight.dtype
    hf.save_pretrained(out_dir)
    gen = copy.deepcopy(base.generation_config)
    # Plain HF generate then stops where osum does (the layout's end token and the tokenizer's eos).
    gen.eos_token_id = list(model.prompts.stop_ids)
    gen.pad_token_id = model.tokenizer.pad_token_id
    gen.save_pretrained(out_dir)
    model.tokenizer.save_pretrained(out_dir)
    # Tied output embeddings are stored once, under embed_tokens, as transformers expects.
    skip = {"lm_head.weight"} if hf.get_text_config().tie_word_embeddings else set()
    _save_sharded(iter_llm_tensors(model), out_dir, dtype, skip)


def _is_own(key: str) -> bool:
    """A tensor of osum's own parts (adaptor, layer mix, voice summary, speech embeddings), stored apart from
    encoder/ and llm/."""
    return key.startswith(("adaptor.", "layer_mix.", "summary.")) or key == "speech_embeds"


def export_hf(model: SpeechLLM, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the HF-style directory atomically (a temp dir renamed into place); LoRA is folded into the LLM."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another output directory")
    cfg = copy.deepcopy(model.config)
    cfg.encoder.name, cfg.llm.name, cfg.llm.tokenizer = "encoder", "llm", None
    cfg.llm.dtype = dtype_name(dtype or model.base_llm.get_input_embeddings().weight.dtype)
    cfg.lora.enabled = False
    with fileio.atomic_dir(out_dir) as tmp:
        _export_encoder(model, tmp / "encoder", dtype)
        _export_llm(model, tmp / "llm", dtype)
        own = {k: v for k, v in model.state_dict().items() if _is_own(k)}
        save_file({k: v.contiguous() for k, v in own.items()}, str(tmp / ADAPTOR_FILE), metadata={"format": "pt"})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.to_dict()}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    return out_dir


def is_hf_export(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def load_hf_export(path: str | Path, device: str | torch.device = "cpu") -> SpeechLLM:
    """Build the model from the directory's encoder/ and llm/, then load the adaptor strictly."""
    path = Path(path)
    meta = json.loads((path / MARKER).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / MARKER}: format {meta.get('format')!r} version {meta.get('format_version')!r}, "
                         f"expected {FORMAT!r} version {FORMAT_VERSION}")
    cfg = from_dict(ModelConfig, meta["model"])
    cfg.encoder.name = str((path / "encoder").resolve())
    cfg.llm.name = str((path / "llm").resolve())
    model = SpeechLLM(cfg)
    expected = {k: v for k, v in model.state_dict().items() if _is_own(k)}
    with safe_open(str(path / ADAPTOR_FILE), framework="pt") as f:
        found = set(f.keys())
        missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
        if missing or unexpected:
            raise KeyError(f"{path / ADAPTOR_FILE}: missing {missing[:10]}, unexpected {unexpected[:10]}")
        with torch.no_grad():
            for key, target in expected.items():
                value = f.get_tensor(key)
                if value.shape != target.shape:
                    raise ValueError(f"{key}: file shape {tuple(value.shape)} != model shape {tuple(target.shape)}")
                target.copy_(value.to(target.dtype))
    return model.to(device).eval()
