"""The released osum-tiny in models/osum-tiny: what `osum.load()`, `osum infer` and `make demo` default to."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

import osum
from osum import config
from osum.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, group_of

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "models" / "osum-tiny"
# A regression guard, not the goal (25 % WER on real speech, which this release meets with beam search, its
# default decoding: see its model card): the release's corpus WER on the four example clips with its own decoding
# settings (0.42 with beam search; 0.56 greedy), and a ceiling above it (0.73, 0.87 and 0.69 for the three releases
# before, greedy). Genders are the speakers' (examples/SOURCES.md); this release gets all four (the one before scored
# espeak_male_finance female by a margin of 0.06). The guard is the count of right genders.
EXAMPLES_WER_MEASURED = 0.42
EXAMPLES_WER_CEILING = 0.55
EXAMPLE_GENDERS = {"asterisk_weasels_8k": "female", "espeak_female_weather": "female",
                   "espeak_male_finance": "male", "librivox_mister_john_dashwood": "male"}  # examples/SOURCES.md
EXAMPLE_GENDERS_RIGHT_MEASURED = 4


def test_released_name_resolves_home_first_then_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("OSUM_HOME", str(tmp_path))
    assert osum.released_model_dir("osum-tiny") == RELEASE
    mine = tmp_path / "released" / "osum-tiny"
    mine.mkdir(parents=True)
    shutil.copy(RELEASE / CONFIG_FILE, mine / CONFIG_FILE)
    assert osum.released_model_dir("osum-tiny") == mine
    monkeypatch.setattr(config, "released_roots", lambda: [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="copy the folder models/osum-tiny"):
        osum.load()
    with pytest.raises(ValueError, match="preset:osum-tiny"):
        osum.load("osum-tiny", overrides=["lora.r=4"])
    assert osum.load("preset:tiny").config.name == "tiny"  # the untrained preset stays reachable by name


def test_release_holds_only_the_trained_parts_in_bf16_under_60_mb():
    """Base models by name; adaptor, layer mix, summary (with its event and age heads and the event's frame
    locator), LoRA and speech embeddings."""
    meta = json.loads((RELEASE / CONFIG_FILE).read_text())
    assert meta["stored_groups"] == ["adaptor", "speech_embeds", "layer_mix", "summary", "lora"]
    model = meta["model"]
    assert model["encoder"]["name"] == "whisper-base" and not model["encoder"]["trainable"]
    assert model["llm"]["name"] == "smollm2-135m-instruct" and model["lora"]["enabled"]
    assert sum(f.stat().st_size for f in RELEASE.rglob("*") if f.is_file()) < 60e6
    with safe_open(str(RELEASE / WEIGHTS_FILE), framework="pt") as f:
        keys = list(f.keys())
        assert {group_of(k) for k in keys} == {"adaptor", "speech_embeds", "layer_mix", "summary", "lora"}
        # bf16 but the fitted heads and the frame locator, which keep float32 (checkpoint._keep_fp32)
        fitted = {"summary.heads.event.weight", "summary.heads.event.bias", "summary.heads.age.weight",
                  "summary.heads.age.bias", "summary.locator.weight", "summary.locator.bias"}
        assert {k for k in keys if str(f.get_slice(k).get_dtype()) != "BF16"} == fitted
        assert all(str(f.get_slice(k).get_dtype()) == "F32" for k in fitted)
    assert model["adaptor"]["tag_heads"] == ["event", "age"]
    assert (model["adaptor"]["located_head"], model["adaptor"]["locator_layer"]) == ("event", 2)
    assert model["generation"]["summary_tags"] == ["gender", "age", "event"]
    assert model["generation"]["ctc_weight"] == 0.5  # joint CTC decoding, chosen on the valid split (model card)
    assert model["generation"]["num_beams"] == 4  # beam search, chosen on the valid split (model card)


@pytest.mark.slow
def test_default_model_transcribes_and_labels_the_examples():
    from osum.evaluate.metrics import corpus_counts
    from osum.evaluate.normalize import english
    from osum.infer.engine import Engine

    model = osum.load()
    clips = sorted((ROOT / "examples").glob("*.wav"))
    results = Engine(model, max_batch_size=4).run([(c.stem, str(c)) for c in clips], task="asr+sgc")
    refs = [english(c.with_suffix(".txt").read_text()) for c in clips]
    hyps = [english(r["text"] or "") for r in results]
    wer = corpus_counts("wer", refs, hyps).rate
    # every clip gets a transcript and a gender, at least as many right as measured; every answer in the task's format
    assert all(r["text"] for r in results), results
    right = sum(r["labels"].get("gender") == EXAMPLE_GENDERS[c.stem] for c, r in zip(clips, results))
    assert right >= EXAMPLE_GENDERS_RIGHT_MEASURED, results
    assert not any(r.get("parse_errors") for r in results), results
    assert wer <= EXAMPLES_WER_CEILING, (wer, EXAMPLES_WER_MEASURED, hyps)
