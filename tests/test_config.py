"""Config: presets load, YAML/JSON round-trip, dotted overrides are typed, unknown keys fail by name."""
from __future__ import annotations

import pytest

from osum.config import ModelConfig, presets


def test_presets_load():
    assert {"tiny", "osum-tiny", "osum-qwen2-7b", "osum-qwen3-8b"} <= set(presets())
    for name in presets():
        cfg = ModelConfig.load(name)
        assert cfg.name == name
    paper = ModelConfig.load("osum-qwen2-7b")
    assert (paper.adaptor.d_model, paper.adaptor.ffn_dim, paper.adaptor.num_layers) == (1024, 2560, 4)
    assert (paper.lora.r, paper.lora.alpha) == (8, 32)
    assert "up_proj" not in paper.lora.target_modules


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_load_roundtrip(tmp_path, suffix):
    cfg = ModelConfig.load("tiny", ["adaptor.num_layers=3", "lora.target_modules=[q_proj,v_proj]"])
    path = tmp_path / f"cfg{suffix}"
    cfg.save(path)
    assert ModelConfig.load(path) == cfg


def test_overrides_are_typed():
    cfg = ModelConfig.load("tiny", ["adaptor.num_layers=2", "generation.temperature=0.7", "encoder.trainable=true"])
    assert cfg.adaptor.num_layers == 2 and isinstance(cfg.adaptor.num_layers, int)
    assert cfg.generation.temperature == 0.7
    assert cfg.encoder.trainable is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("adaptor.num_layer=2", "adaptor.num_layer"),
        ("nonsense.x=1", "nonsense"),
        ("adaptor.num_layers=two", "adaptor.num_layers"),
        ("adaptor.num_layers=2.5", "adaptor.num_layers"),
        ("encoder.trainable=maybe", "encoder.trainable"),
        ("adaptor.num_layers", "dotted.key=value"),
    ],
)
def test_bad_overrides_fail_by_name(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        ModelConfig.load("tiny", [override])


def test_unknown_preset():
    with pytest.raises(FileNotFoundError, match="presets"):
        ModelConfig.load("no-such-model")


def test_generation_settings_are_checked_when_built():
    from osum.config import GenerationConfig

    for bad, match in (({"summary_tags": ["mood"]}, "summary_tags"),
                       ({"compression_ratio_threshold": 0}, "compression_ratio_threshold"),
                       ({"fallback_repetition_penalties": [1.1, 0]}, "fallback_repetition_penalties"),
                       ({"word_times": "whisper"}, "word_times"),
                       ({"ctc_time_offsets": [0.1]}, "ctc_time_offsets")):
        with pytest.raises(ValueError, match=match):
            GenerationConfig(**bad)
    assert GenerationConfig(summary_tags=["gender", "age"], compression_ratio_threshold=None).summary_tags
