"""`osum eval` end to end with the tiny random model (garbage outputs, real files), checked against `osum score`
on the same outputs; `osum eval --suite` writes one table."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import osum
from osum.cli import main
from osum.evaluate.run import EvalOptions, evaluate, run_suite

EXAMPLES = Path("examples").resolve()
CLIPS = {  # key -> (file, gender or None)
    "weather": ("espeak_female_weather", "female"),
    "finance": ("espeak_male_finance", "male"),
    "dashwood": ("librivox_mister_john_dashwood", None),
    "weasels": ("asterisk_weasels_8k", "male"),
}


def eval_set(tmp_path: Path, bad_audio: str) -> Path:
    """The example clips with their transcripts, a generated noise clip (relative path) and one unreadable file."""
    rows = []
    for key, (name, gender) in CLIPS.items():
        row = {"key": key, "audio": str(EXAMPLES / f"{name}.wav"), "task": "asr+sgc",
               "text": (EXAMPLES / f"{name}.txt").read_text().strip()}
        if gender:
            row["gender"] = gender
        rows.append(row)
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "noise.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    rows.append({"key": "noise", "wav": "noise.wav", "text": "", "gender": "female", "task": "asr+sgc"})
    rows.append({"key": "broken", "audio": bad_audio, "text": "never heard", "gender": "male", "task": "asr+sgc"})
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def score_json(capsys, *args) -> dict:
    assert main(["score", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_end_to_end_matches_score(tmp_path, capsys, bad_audio_files):
    data = eval_set(tmp_path, bad_audio_files[1])
    out = tmp_path / "run"
    code = main(["eval", "--model", "tiny", "--data", str(data), "--out", str(out), "--max-new-tokens", "6",
                 "--batch-size", "4"])
    assert code == 1  # one utterance failed; it is still scored (as an empty output)
    assert sorted(p.name for p in out.iterdir()) == ["confusion_gender.png", "hyp.jsonl", "report.md", "summary.json"]
    records = [json.loads(line) for line in (out / "hyp.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["key"] for r in records] == [*CLIPS, "noise", "broken"]
    assert "not a readable audio file" in records[-1]["error"] and records[-1]["hyp"] is None
    assert summary["counts"] == {"utterances": 6, "failed": 1, "missing_hyp": 0,
                                 "with_parse_errors": summary["counts"]["with_parse_errors"]}
    assert summary["run"]["task"] == "asr+sgc" and summary["run"]["max_new_tokens"] == 6  # task from the data
    text, gender = summary["text"], summary["tags"]["gender"]
    assert text["metric"] == "wer" and text["utterances"] == 6
    assert gender["total"] == 5 and gender["skipped"] == {"no reference label": 1}  # dashwood has no gender
    # every summary number is the sum of the per-utterance records
    for k in ("substitutions", "deletions", "insertions", "hits"):
        assert text[k] == sum(r["errors"]["wer"][k] for r in records)
    assert gender["correct"] == sum(r["errors"]["gender"]["correct"] for r in records if "gender" in r["errors"])
    assert records[-1]["errors"]["wer"]["deletions"] == 2  # "never heard" against nothing
    report = (out / "report.md").read_text()
    assert f"osum eval --model tiny --data {data} --task asr+sgc --out {out}" in report
    assert "## Transcript: WER" in report and "![gender confusion](confusion_gender.png)" in report
    assert "WER" in capsys.readouterr().out

    # osum score on the same outputs gives the same numbers: JSONL outputs ...
    scored = score_json(capsys, "--ref", str(data), "--hyp", str(out / "hyp.jsonl"), "--metric", "wer")
    assert {k: scored["text"][k] for k in text if k != "skipped"} == {k: text[k] for k in text if k != "skipped"}
    assert scored["counts"]["failed"] == 1
    scored = score_json(capsys, "--ref", str(data), "--hyp", str(out / "hyp.jsonl"), "--metric", "acc")
    assert scored["tags"] == {"gender": {k: v for k, v in gender.items() if k != "plot"}}
    # ... and Kaldi `key text` lines of the raw model output, with Kaldi references
    raw = tmp_path / "hyp.txt"
    raw.write_text("".join(f"{r['key']} {r['hyp']['raw']}\n" for r in records if r["hyp"]))
    ref = tmp_path / "ref.txt"
    ref.write_text("".join(f"{json.loads(line)['key']} {json.loads(line)['text']}\n"
                           for line in data.read_text().splitlines()))
    scored = score_json(capsys, "--ref", str(ref), "--hyp", str(raw), "--metric", "wer", "--task", "asr+sgc")
    assert scored["text"]["rate"] == text["rate"] and scored["text"]["errors"] == text["errors"]
    assert scored["counts"]["missing_hyp"] == 1 and scored["counts"]["failed"] == 0
    scored = score_json(capsys, "--ref", str(data), "--hyp", str(raw), "--metric", "acc", "--task", "asr+sgc")
    assert scored["tags"]["gender"]["correct"] == gender["correct"]


def test_score_cli_plain_text(tmp_path, capsys):
    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("u1 the cat sat on the mat\nu2 今天天气很好\n")
    hyp.write_text("u1 The cat sit on mat today<happy>\nu2 今天 天气 很 好\nu3 extra\n")
    assert main(["score", "--ref", str(ref), "--hyp", str(hyp), "--metric", "mer"]) == 0
    out = capsys.readouterr().out
    assert "MER 25.00% (S 1, D 1, I 1, reference tokens 12)" in out and "outputs without a reference 1" in out
    assert main(["score", "--ref", str(ref), "--hyp", str(hyp), "--metric", "acc"]) == 2
    assert "no reference has a tag field" in capsys.readouterr().err


def test_suite_writes_one_table(tmp_path, tiny_model, monkeypatch, bad_audio_files):
    monkeypatch.setattr(osum, "load", lambda name, device="cpu": tiny_model)
    data = eval_set(tmp_path, bad_audio_files[1])
    words = [{"word": w, "start": 0.3 * i, "end": 0.3 * i + 0.25}
             for i, w in enumerate("the weather report says".split())]
    srwt = tmp_path / "srwt.jsonl"
    srwt.write_text(json.dumps({"key": "weather", "audio": str(EXAMPLES / "espeak_female_weather.wav"),
                                "words": words, "task": "srwt"}) + "\n")
    suite = tmp_path / "bench.yaml"
    suite.write_text(
        "model: tiny\nout: bench\ndefaults: {max_new_tokens: 6, plots: false}\n"
        "runs:\n"
        f"  - {{name: examples-asr-sgc, data: {data.name}, task: asr+sgc, limit: 3}}\n"
        f"  - {{name: examples-srwt, data: {srwt.name}}}\n")
    rows, table = run_suite(suite)
    assert table == tmp_path / "bench" / "results.md"
    text = table.read_text()
    assert "| examples-asr-sgc | asr+sgc | tiny | 3 | 0 | WER % |" in text
    assert "| examples-asr-sgc | asr+sgc | tiny | 3 | 0 | gender accuracy % |" in text
    assert "| examples-srwt | srwt | tiny | 1 | 0 | AAS ms |" in text
    assert sorted(p.name for p in (tmp_path / "bench").iterdir()) == [
        "examples-asr-sgc", "examples-srwt", "results.json", "results.md"]
    aas = rows[1]["summary"]["aas"]
    assert aas["ref_words"] == 4 and aas["aligned"] + aas["unaligned_ref"] == 4
    scored = run_score(tmp_path / "bench" / "examples-srwt" / "hyp.jsonl", srwt)
    assert scored["aas"] == aas
    # the same sets for another model, into another folder
    rows, table = run_suite(suite, out=tmp_path / "other", model="checkpoint-x")
    assert {r["model"] for r in rows} == {"checkpoint-x"} and table == tmp_path / "other" / "results.md"
    assert f"osum eval --suite {suite} --model checkpoint-x --out {tmp_path / 'other'}" in table.read_text()
    # the same sets decoded another way: every run's joint CTC weight, spelled out in each run's command
    rows, table = run_suite(suite, out=tmp_path / "ctc", ctc_weight=0.25)
    assert all(r["summary"]["run"]["generation"]["ctc_weight"] == 0.25 for r in rows)
    assert all("--ctc-weight 0.25" in r["summary"]["command"] for r in rows)
    assert f"osum eval --suite {suite} --ctc-weight 0.25 --out {tmp_path / 'ctc'}" in table.read_text()
    # and with another decoding preset than the suite's defaults
    rows, table = run_suite(suite, out=tmp_path / "beam", decoding="beam")
    assert all(r["summary"]["run"]["decoding"] == "beam" for r in rows)
    assert all(r["summary"]["run"]["generation"]["num_beams"] == 4 for r in rows)
    assert f"osum eval --suite {suite} --decoding beam --out {tmp_path / 'beam'}" in table.read_text()
    with pytest.raises(ValueError, match="unknown keys"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("model: tiny\nruns:\n  - {name: x, data: y, tsak: asr}\n")
        run_suite(bad)


def run_score(hyp: Path, ref: Path) -> dict:
    from osum.evaluate.run import score_files

    return score_files(ref, hyp, "aas")[1]


def test_eval_options_spell_out_the_command(tiny_model, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"key": "a", "audio": str(EXAMPLES / "asterisk_weasels_8k.wav"), "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="give --task"):
        evaluate(tiny_model, data, None, tmp_path / "out")
    summary = evaluate(tiny_model, data, "only:sgc", tmp_path / "out", EvalOptions(max_new_tokens=4, plots=False),
                       model_name="tiny")
    assert "text" not in summary and summary["tags"]["gender"]["skipped"] == {"no reference label": 1}
    assert summary["command"] == (f"osum eval --model tiny --data {data} --task only:sgc --out {tmp_path / 'out'} "
                                  "--metric auto --normalizer auto --batch-size 16 --decoding model --device cpu "
                                  "--max-new-tokens 4 --no-plots")
    assert summary["run"]["generation"]["max_new_tokens"] == 4
    assert summary["run"]["decoding"] == "model"
    assert "Decoding defaults of the model" not in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ValueError, match="decoding 'widest' is not a preset; presets: model, greedy, beam"):
        evaluate(tiny_model, data, "only:sgc", tmp_path / "out", EvalOptions(decoding="widest"))


def test_eval_decodes_with_the_model_settings_unless_a_preset_is_given(tiny_model, tmp_path, monkeypatch):
    import dataclasses

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"key": "a", "audio": str(EXAMPLES / "asterisk_weasels_8k.wav"), "text": "x"}) + "\n")
    # monkeypatch puts the shared fixture's settings back after the test
    monkeypatch.setattr(tiny_model.config, "generation", dataclasses.replace(tiny_model.config.generation, num_beams=3))
    beams = {}
    for decoding in ("model", "greedy", "beam"):
        summary = evaluate(tiny_model, data, "asr", tmp_path / decoding,
                           EvalOptions(decoding=decoding, max_new_tokens=2, plots=False))
        beams[summary["run"]["decoding"]] = summary["run"]["generation"]["num_beams"]
    assert beams == {"model": 3, "greedy": 1, "beam": 4}
    # the report says how the run searched, which `--decoding model` leaves to the config
    assert "Decoding (`--decoding model`): beam search over 3 beams." in (tmp_path / "model" / "report.md").read_text()
    assert "Decoding (`--decoding greedy`): greedy." in (tmp_path / "greedy" / "report.md").read_text()


def test_eval_report_names_answers_that_do_not_come_from_the_text(tiny_model, tmp_path, monkeypatch):
    """Labels from the voice summary and CTC word times are the model's defaults, not options: the report says so."""
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"key": "a", "audio": str(EXAMPLES / "asterisk_weasels_8k.wav"), "text": "x"}) + "\n")
    gen = dataclasses.replace(tiny_model.config.generation, word_times="ctc", ctc_time_offsets=[-0.125, -0.021])
    monkeypatch.setattr(tiny_model.config, "generation", gen)
    summary = evaluate(tiny_model, data, "srwt", tmp_path / "out", EvalOptions(max_new_tokens=4, plots=False))
    assert summary["run"]["generation"]["word_times"] == "ctc"
    assert "srwt word times from the CTC alignment of the transcript (offsets -0.125 s start, -0.021 s end)" in (
        tmp_path / "out" / "report.md").read_text()
    assert summary["run"]["tag_heads"] == []
    from osum.evaluate.report import _sources_of_answers

    lines = _sources_of_answers({"summary_tags": ["gender", "event"]}, ["event"])
    assert "- labels read off the voice summary, not the text: gender, event (event by a linear head fitted on its " \
           "statistics)" in lines
    assert summary["run"]["located_head"] is None
    lines = _sources_of_answers({"summary_tags": ["gender", "event"]}, ["event"], "event")
    assert "- labels read off the voice summary, not the text: gender, event (event by a linear head fitted on its " \
           "statistics; for event, pooled where a fitted frame locator hears it)" in lines
    assert summary["run"]["locator_crop"] is None
    lines = _sources_of_answers({"summary_tags": ["event"]}, ["event"], "event", 40)
    assert "- labels read off the voice summary, not the text: event (event by a linear head fitted on its " \
           "statistics; for event, from the 81 frames around a fitted frame locator's peak)" in lines


def test_eval_sttc_with_a_local_judge(tiny_model, tmp_path, judge_server):
    server, handler = judge_server
    handler.replies = [(200, "Score: 3")]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"key": "q1", "audio": str(EXAMPLES / "espeak_female_weather.wav"), "task": "sttc",
                                "text": "the weather report says it will rain all afternoon so bring an umbrella",
                                "answer": "Good idea, stay dry."}) + "\n")
    url = f"http://127.0.0.1:{server.server_port}/v1"
    summary = evaluate(tiny_model, data, None, tmp_path / "out",
                       EvalOptions(max_new_tokens=4, judge_url=url, judge_model="local-judge"))
    assert summary["judge"] == {"status": "scored", "url": f"{url}/chat/completions", "model": "local-judge",
                                "mean": 3.0, "scored": 1, "failed": {}, "skipped": {}}
    assert "Good idea, stay dry." in handler.requests[0]["body"]["messages"][-1]["content"]
    assert "mean score **3.00** / 10" in (tmp_path / "out" / "report.md").read_text()
    assert f"--judge-url {url} --judge-model local-judge" in summary["command"]
