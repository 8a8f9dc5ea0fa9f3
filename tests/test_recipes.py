"""Recipe configs parse and validate (OSUM ships configs that fail their own checks; ours are tested)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from osum.config import load_train_config
from osum.data.mixture import load_mixture

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "osum-qwen2-7b"


def test_paper_stages_parse_and_chain():
    stages = [load_train_config(RECIPE / f"stage{i}.yaml") for i in (1, 2, 3)]
    trainable = [(s.model.encoder.trainable, s.model.adaptor.trainable, s.model.lora.enabled) for s in stages]
    assert trainable == [(False, True, False), (True, True, False), (True, True, True)]
    assert [s.init_from for s in stages] == [None, f"{stages[0].out_dir}/final", f"{stages[1].out_dir}/final"]
    for s in stages:
        assert s.model.llm.name == "Qwen/Qwen2-7B-Instruct" and s.precision == "bf16"
        assert (s.optim.lr, s.optim.betas, s.optim.eps, s.optim.grad_clip) == (5e-5, [0.9, 0.99], 1e-6, 5.0)
        assert Path(s.data.mixture).resolve() == (RECIPE / "data" / "mixture.yaml").resolve()


def test_recipe_mixture_parses():
    mixture = load_mixture(RECIPE / "data" / "mixture.yaml")
    assert len(mixture["train"]) == 8 and len(mixture["valid"]) == 1


def test_overrides_reach_stage_configs():
    cfg = load_train_config(RECIPE / "stage3.yaml", ["optim.lr=1e-4", "model.lora.r=16", "engine=fsdp2"])
    assert (cfg.optim.lr, cfg.model.lora.r, cfg.engine) == (1e-4, 16, "fsdp2")
    with pytest.raises(ValueError, match="optim.lrr"):
        load_train_config(RECIPE / "stage3.yaml", ["optim.lrr=1"])


def test_preset_override_swaps_the_base_model():
    cfg = load_train_config(RECIPE / "stage3.yaml", ["model.preset=tiny", "model.lora.r=2"])
    assert cfg.model.name == "tiny" and cfg.model.encoder.name is None and cfg.model.lora.r == 2
    assert cfg.model.lora.enabled and cfg.model.encoder.trainable  # the stage's own settings still apply


def test_osum_tiny_stages_keep_the_encoder_frozen_and_use_ctc():
    tiny = RECIPE.parent / "osum-tiny"
    stages = [load_train_config(tiny / f"stage{i}.yaml") for i in (0, 1, 2, 3)]
    # the release then stores only adaptor + LoRA + speech embeddings (< 60 MB); bf16 autocast where the device
    # computes it natively, fp32 on other CPUs
    assert [(s.model.encoder.trainable, s.model.lora.enabled) for s in stages] == [
        (False, False), (False, False), (False, True), (False, True)]
    assert all(s.precision == "auto" for s in stages)
    # stage 0 is the CTC-only warm-up; the CTC loss stays on once the LLM's loss joins
    assert (stages[0].lm_weight, stages[0].ctc_weight > 0) == (0.0, True)
    assert all(s.lm_weight == 1.0 and s.ctc_weight > 0 for s in stages[1:])
    # stage 3 adds the voice: lower blocks into the adaptor, a summary position with its own loss
    assert stages[3].model.adaptor.encoder_layers and stages[3].model.adaptor.summary_layers
    assert stages[3].summary_weight > 0 and stages[3].data.only_x_share == 0


def test_osum_tiny_release_suite_agrees_with_run_sh():
    tiny = RECIPE.parent / "osum-tiny"
    pairs = re.search(r"for pair in ([^;]+);", (tiny / "run.sh").read_text()).group(1).split()
    suite = yaml.safe_load((tiny / "eval.yaml").read_text())
    runs = {r["name"]: r for r in suite["runs"]}
    assert suite["model"] == "osum-tiny" and set(runs) == {f"synth-{p.split(':')[0]}" for p in pairs} | {"real"}
    for pair in pairs:
        family, task = pair.split(":")
        assert runs[f"synth-{family}"]["task"] == task
        assert runs[f"synth-{family}"]["data"].endswith(f"data/osum-tiny/test_synth_{family}.jsonl")


@pytest.mark.parametrize("name", ["mixture-continue", "mixture-continue-real", "mixture-continue-open"])
def test_osum_tiny_continuation_mixtures_parse(name):
    mixture = load_mixture(RECIPE.parent / "osum-tiny" / f"{name}.yaml")
    assert [(d.name, d.task) for d in mixture["train"]][:2] == [("synth", None), ("synth-auto", "auto")]
    assert all(d.shards.startswith(str(RECIPE.parent / "osum-tiny")) for d in mixture["train"] + mixture["valid"])
    assert {d.name for d in mixture["train"]} == {"synth", "synth-auto", "synth-ved", "synth-srwt", "open", "real"}


def test_ctc_vs_llm_scores_the_runs_transcripts_and_the_ctc_heads(tiny_model, tmp_path, monkeypatch, capsys):
    """recipes/osum-tiny/ctc_vs_llm.py: its LLM figure is the eval run's own WER; its CTC figure scores the
    model's greedy CTC transcripts by the same metric."""
    import runpy
    import sys

    import torch

    import osum
    from osum.audio import load_audio, log_mel_spectrogram
    from osum.evaluate.metrics import corpus_counts
    from osum.evaluate.normalize import english
    from osum.evaluate.run import EvalOptions, evaluate

    examples = Path(__file__).resolve().parents[1] / "examples"
    data = tmp_path / "list.jsonl"
    clips = sorted(examples.glob("*.wav"))[:2]
    data.write_text("".join(json.dumps({"key": c.stem, "audio": str(c), "text": c.with_suffix(".txt").read_text()})
                            + "\n" for c in clips))
    summary = evaluate(tiny_model, data, "asr", tmp_path / "run", EvalOptions(max_new_tokens=6, plots=False))
    refs, ctc = [], []
    for clip in clips:
        mel = log_mel_spectrogram(load_audio(str(clip))).T[None]
        with torch.no_grad():
            out, lens, _ = tiny_model._encode(mel, torch.tensor([mel.shape[1]]))
        refs.append(english(clip.with_suffix(".txt").read_text()))
        ctc.append(english(tiny_model.tokenizer.decode(tiny_model.ctc_greedy(tiny_model.ctc_logits(out), lens)[0])))
    c = corpus_counts("wer", refs, ctc)
    ctc_rate = (c.substitutions + c.deletions + c.insertions) / (c.hits + c.substitutions + c.deletions)
    monkeypatch.setattr(osum, "load", lambda name, **kw: tiny_model)
    monkeypatch.setattr(sys, "argv", ["ctc_vs_llm.py", str(tmp_path / "run")])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "osum-tiny" / "ctc_vs_llm.py"),
                   run_name="__main__")
    printed = capsys.readouterr().out
    assert (f"2 utterances of {tmp_path / 'run'}: WER of the LLM's transcripts {100 * summary['text']['rate']:.1f} %, "
            f"of the adaptor's greedy CTC transcripts {100 * ctc_rate:.1f} %") in printed


def test_event_clips_counts_each_clip_from_the_synth_metadata(tmp_path, monkeypatch, capsys):
    """recipes/osum-tiny/event_clips.py: per-clip right counts from the metadata beside each audio file, and the
    accuracy with clips weighted alike beside the one over utterances."""
    import runpy
    import sys

    script = str(Path(__file__).resolve().parents[1] / "recipes" / "osum-tiny" / "event_clips.py")
    run = tmp_path / "run"
    run.mkdir()
    rows = [("u1", "Pack/Laugh.ogg", "laugh", "laugh"), ("u2", "Pack/Laugh.ogg", "laugh", "screaming"),
            ("u3", "Other/PoisonCough.ogg", "cough", "cough"), ("u4", None, None, "laugh")]
    with open(run / "hyp.jsonl", "w") as f:
        for key, clip, ref, heard in rows:
            audio = tmp_path / f"{key}.flac"
            if clip:
                (tmp_path / f"{key}.json").write_text(json.dumps({"sample": {"extra": {"event": {"clip": clip}}}}))
            f.write(json.dumps({"key": key, "audio": str(audio), "ref": {"event": ref} if ref else {"text": "x"},
                                "hyp": {"labels": {"event": heard}}}) + "\n")
    monkeypatch.setattr(sys, "argv", ["event_clips.py", str(run)])
    runpy.run_path(script, run_name="__main__")
    out = capsys.readouterr().out
    assert "| laugh | Pack/Laugh.ogg | 2 | 1 | laugh 1, screaming 1 |" in out
    assert "| cough | Other/PoisonCough.ogg | 1 | 1 | cough 1 |" in out
    assert ("3 utterances of 2 clips: accuracy 66.7% over utterances, 75.0% with every clip weighted alike; the most "
            "drawn clip, Pack/Laugh.ogg, holds 2 utterances (1 right)") in out
    (tmp_path / "u3.json").unlink()
    with pytest.raises(SystemExit, match="u3.json: no `osum synth` metadata"):
        runpy.run_path(script, run_name="__main__")
