"""recipes/osum-tiny/run.sh at test scale: its training, export and evaluation stages (3–7) with the tiny
preset on generated clips; the voice and synthesis stages are covered by tests/test_synth.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.data_fixtures import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_training_export_eval_stages(tmp_path):
    listing = make_dataset(tmp_path, n=20, tasks=("asr+sgc", "asr+ser", "srwt", "asr+ved", "asr+sap"))
    data = listing.parent
    rows = [json.loads(line) for line in listing.read_text().splitlines()]
    # the training split's word times, events and ages, on which the export fits the CTC word-time offsets, the
    # event head and the age head (cross-validated by voice)
    def event(r: dict) -> dict:  # an inserted event as osum synth records it
        return {"clip": r["key"], "recording": r["key"], "span": [0.1, 0.4]}

    extra = {"ved": lambda r: {**r, "extra": {"event": event(r)}}, "sap": lambda r: {**r, "speaker": r["key"][-1]},
             "srwt": lambda r: r}
    for task, name in (("srwt", "srwt"), ("asr+ved", "ved"), ("asr+sap", "sap")):
        (data / f"train_synth_{name}.jsonl").write_text("".join(
            json.dumps(extra[name](r)) + "\n" for r in rows if r["task"] == task))
    ved = [r for r in rows if r["task"] == "asr+ved"]
    # stage 1's extra event utterances (Scratch's coughs), which the event head fits too
    (data / "train_extra_ved.jsonl").write_text("".join(
        json.dumps({**r, "key": f"extra-{r['key']}", "extra": {"event": {**event(r), "recording": "extra/x"}}}) + "\n"
        for r in ved[:2]))
    assert len({r["event"] for r in ved}) > 1
    assert len({r["age"] for r in rows if r["task"] == "asr+sap"}) > 1
    (data / "mixture.yaml").write_text("train:\n  synth: {shards: list.jsonl}\nvalid:\n  synth: {shards: list.jsonl}\n")
    shutil.copy(listing, data / "test_synth_sgc.jsonl")
    # the valid splits as eval lists, on which the export chooses the joint CTC decoding weight
    (data / "valid_synth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (data / "valid_real.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:6]))
    shutil.copy(listing, data / "test_real.jsonl")
    exp, out = tmp_path / "exp", tmp_path / "model"
    out.mkdir()
    (out / "README.md").write_text("model card of an earlier export\n")  # export replaces the folder but keeps it
    env = {**os.environ, "STAGES": "3 4 5 6 7", "PRESET": "tiny", "DATA": str(data), "EXP": str(exp),
           "OUT": str(out), "STEPS0": "2", "STEPS1": "2", "STEPS2": "2", "STEPS3": "2", "AVERAGE": "1",
           "OSUM": str(Path(sys.executable).parent / "osum"), "OMP_NUM_THREADS": "1"}
    # Stage 3 names whisper-base's blocks; the tiny encoder has two (the arguments reach every stage).
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "osum-tiny" / "run.sh"), "save_every=1", "log_every=1",
                           "tensorboard=false", "model.adaptor.encoder_layers=[1]",
                           "model.adaptor.summary_layers=[0,1]"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in (0, 1, 2, 3):
        assert (exp / f"stage{stage}" / "final" / "config.json").is_file()
        # the valid sets come from the mixture file, not data.valid: they are validated on all the same
        assert '"valid_loss"' in (exp / f"stage{stage}" / "metrics.jsonl").read_text()
    # stage 0 aligns the adaptor by its CTC loss alone, on the transcripts the real pipeline carries; stage 1
    # adds the LLM's loss and keeps the CTC loss
    steps = {n: [json.loads(line) for line in (exp / f"stage{n}" / "metrics.jsonl").read_text().splitlines()
                 if '"grad_norm"' in line] for n in (0, 1)}
    assert all(r["ctc_loss"] > 0 and "loss" not in r for r in steps[0])
    assert all(r["ctc_loss"] > 0 and r["loss"] > 0 for r in steps[1])
    stage3 = json.loads((exp / "stage3" / "final" / "config.json").read_text())
    # LoRA joins in stage 2; the whisper encoder stays frozen so the release holds only what was trained.
    assert stage3["model"]["lora"]["enabled"] and not stage3["model"]["encoder"]["trainable"]
    # stage 3 adds the voice: the layer mix, the summary position and the summary's loss
    assert {"layer_mix", "summary"} <= set(stage3["stored_groups"])
    assert '"summary_loss"' in (exp / "stage3" / "metrics.jsonl").read_text()
    results = (exp / "eval" / "results.md").read_text()
    assert "synth-sgc" in results and "real" in results
    released = json.loads((out / "config.json").read_text())
    assert (out / "README.md").read_text() == "model card of an earlier export\n"
    assert "lora" in released["stored_groups"] and released["model"]["lora"]["enabled"]  # LoRA kept apart
    generation = released["model"]["generation"]
    assert generation["word_times"] == "ctc" and len(generation["ctc_time_offsets"]) == 2
    assert generation["num_beams"] == 4  # beam search as the release's default decoding
    assert released["model"]["adaptor"]["tag_heads"] == ["event", "age"]
    assert "age head fitted on 4 utterances" in proc.stderr and "held out together: speaker)" in proc.stderr
    assert released["model"]["adaptor"]["located_head"] == "event"  # the head reads where the event is
    assert released["model"]["adaptor"]["locator_crop"] == 40  # the frames around the locator's peak
    assert "event frame locator on block" in proc.stderr
    assert (f"event head fitted on {len(ved) + 2} utterances of {data / 'train_synth_ved.jsonl'} + "
            f"{data / 'train_extra_ved.jsonl'}") in proc.stderr
    assert generation["summary_tags"] == ["gender", "age", "event"]
    assert f"generation.ctc_weight {generation['ctc_weight']}" in proc.stderr
    assert f"{data / 'valid_synth.jsonl'}: " in proc.stderr and f"{data / 'valid_real.jsonl'}: " in proc.stderr
    assert f"model: {out}" in (exp / "suite.yaml").read_text()  # stage 7 evaluates what stage 6 exported
    import osum

    assert osum.load(str(out)).understand(str(data / "wav" / "data-0000.wav"), task="asr+sgc")["task"] == "asr+sgc"
