"""osum: speech understanding LLMs (Whisper encoder → adaptor → LLM with LoRA), eight tasks from prompts.

    import osum
    model = osum.load()                           # the released osum-tiny; or a model directory, a preset
    model.understand("clip.wav", task="asr+ser")  # → {"text": ..., "labels": {"emotion": ...}, ...}
"""
from __future__ import annotations

import logging
from pathlib import Path

__version__ = "0.1.0"

log = logging.getLogger(__name__)

DEFAULT_MODEL = "osum-tiny"
# `preset:osum-tiny` names the preset itself (random adaptor and LoRA) where a released model has its name.
PRESET_PREFIX = "preset:"


def released_model_dir(name: str) -> Path:
    """The directory of a released model (`osum.config.RELEASED_MODELS`), from `osum.config.released_roots()`."""
    from osum.config import released_roots

    roots = released_roots()
    for root in roots:
        if (root / name / "config.json").is_file():
            return root / name
    raise FileNotFoundError(
        f"the released model {name!r} is in none of {', '.join(str(r / name) for r in roots)}; copy the folder "
        f"models/{name} of the osum repository to {roots[0] / name}"
    )


def load(
    name_or_dir: str | Path = DEFAULT_MODEL,
    device: str = "cpu",
    overrides: list[str] | None = None,
    llm_config: str | None = None,
    tokenizer: str | None = None,
    layout: str = "osum",
):
    """A model directory (`config.json` + safetensors), an HF-style export (`osum_hf.json`), a reference
    checkpoint file (OSUM's `infer.pt`, or OSUM-EChat's with layout="osum-echat"; `llm_config` and `tokenizer`
    as in `osum convert osum-ckpt`), a released model's name (`osum-tiny`, the default: trained weights), or a
    preset name (random where nothing is trained; `preset:<name>` where a released model has the name)."""
    from osum.config import RELEASED_MODELS, ModelConfig
    from osum.model import checkpoint
    from osum.model.speech_llm import SpeechLLM

    path = Path(name_or_dir)
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt", ".bin"):  # a YAML file is a config, below
        from osum.convert.osum_ckpt import load_osum_checkpoint

        return load_osum_checkpoint(path, layout=layout, overrides=overrides, llm_config=llm_config,
                                    tokenizer=tokenizer, device=device)
    if llm_config is not None or tokenizer is not None:
        raise ValueError("llm_config and tokenizer apply to checkpoint files (OSUM's infer.pt) only")
    from osum.convert import hf

    if hf.is_hf_export(path):
        if overrides:
            raise ValueError("overrides apply to presets; an exported model directory is loaded as it was saved")
        return hf.load_hf_export(path, device=device)
    if (path / checkpoint.CONFIG_FILE).is_file():
        if overrides:
            raise ValueError("overrides apply to presets; a saved model directory is loaded as it was saved")
        return checkpoint.load(path, device=device)
    if str(name_or_dir) in RELEASED_MODELS:
        if overrides:
            raise ValueError(f"overrides apply to presets; the released {name_or_dir} is loaded as it was saved "
                             f"(its untrained preset: '{PRESET_PREFIX}{name_or_dir}')")
        return checkpoint.load(released_model_dir(str(name_or_dir)), device=device)
    if str(name_or_dir).startswith(PRESET_PREFIX):
        name_or_dir = str(name_or_dir)[len(PRESET_PREFIX):]
    cfg = ModelConfig.load(name_or_dir, overrides)
    log.warning(
        "model %r is built from its preset: the adaptor, speech embeddings and LoRA (and any part without a "
        "named base model) are randomly initialised, so its outputs are meaningless until trained",
        cfg.name,
    )
    return SpeechLLM(cfg).to(device).eval()


def __getattr__(name: str):
    # Lazy so that `import osum` stays light (no torch/transformers import for the CLI's --help).
    if name == "SpeechLLM":
        from osum.model.speech_llm import SpeechLLM

        return SpeechLLM
    raise AttributeError(name)


__all__ = ["load", "SpeechLLM", "DEFAULT_MODEL", "__version__"]
