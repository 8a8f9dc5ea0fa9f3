"""Inference engine: per-file errors, long audio split (never truncated), batched == one at a time, merging."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import soundfile as sf

from osum import tasks
from osum.audio import load_audio
from osum.infer.engine import Engine, Piece, compression_ratio, merge
from tests.test_model import diversify

EXAMPLE = "examples/librivox_mister_john_dashwood.wav"


def long_file(path, seconds: float = 70.0) -> str:
    """The example clip repeated with pauses between, cut to exactly `seconds`."""
    clip = load_audio(EXAMPLE)
    pause = np.zeros(16000, dtype=np.float32)
    reps = int(seconds * 16000 // (len(clip) + len(pause))) + 1
    wav = np.concatenate([np.concatenate([clip, pause]) for _ in range(reps)])[: int(seconds * 16000)]
    sf.write(path, wav, 16000)
    return str(path)


@pytest.fixture(scope="module")
def varied_model(tiny_model):
    return diversify(copy.deepcopy(tiny_model)).eval()


def test_good_bad_and_long_inputs(tiny_model, tmp_path, bad_audio_files):
    empty, text = bad_audio_files
    long = long_file(tmp_path / "long.wav")
    results = Engine(tiny_model).run([EXAMPLE, empty, text, long], task="asr+sgc")
    assert [r["key"] for r in results] == [EXAMPLE, empty, text, long]
    assert "empty" in results[1]["error"] and "not a readable audio file" in results[2]["error"]
    for r in (results[0], results[3]):
        assert "error" not in r and r["task"] == "asr+sgc" and isinstance(r["text"], str)
    assert results[3]["duration"] == 70.0
    segments = results[3]["segments"]
    assert segments[0][0] == 0.0 and segments[-1][1] == 70.0 and len(segments) >= 3
    assert all(b - a <= 30.0 for a, b in segments) and all(s[1] == t[0] for s, t in zip(segments, segments[1:]))


def test_batched_equals_one_at_a_time(varied_model):
    clips = ["examples/librivox_mister_john_dashwood.wav", "examples/asterisk_weasels_8k.wav",
             "examples/espeak_female_weather.wav", "examples/espeak_male_finance.wav"]
    batched = Engine(varied_model, max_batch_size=4).run(clips, task="asr")
    single = Engine(varied_model, max_batch_size=1).run(clips, task="asr")
    assert [r["raw"] for r in batched] == [r["raw"] for r in single]
    assert len({r["raw"] for r in batched}) == len(clips)  # distinct outputs: the comparison means something
    # With a repetition penalty too: transformers' own would skip a padded row's first generated tokens.
    penalised = dataclasses.replace(varied_model.config.generation, repetition_penalty=1.1,
                                    compression_ratio_threshold=None)
    batched = Engine(varied_model, max_batch_size=4, generation=penalised).run(clips, task="asr")
    single = Engine(varied_model, max_batch_size=1, generation=penalised).run(clips, task="asr")
    assert [r["raw"] for r in batched] == [r["raw"] for r in single]


def test_looping_outputs_are_decoded_again_with_a_repetition_penalty(tiny_model, monkeypatch):
    """Only the output that loops is decoded again, with each fallback penalty in turn until one does not loop;
    the guard off, the first output stays."""
    calls = []

    def fake_generate(features, lens, prompts, generation, encoded=None, specs=None):
        calls.append((len(prompts), generation.repetition_penalty))
        loops = generation.repetition_penalty < 1.3
        return ["a kind of " * 40 if loops and n == int(lens.max()) else "a plain answer" for n in lens.tolist()]

    monkeypatch.setattr(tiny_model, "generate", fake_generate)
    clips = ["examples/librivox_mister_john_dashwood.wav", "examples/espeak_female_weather.wav"]
    durations = [len(load_audio(c)) for c in clips]
    engine = Engine(tiny_model)
    results = engine.run(clips, task="asr")
    assert calls == [(2, 1.0), (1, 1.1), (1, 1.3)] and engine.stats.redecoded == 1
    assert [r["text"] for r in results] == ["a plain answer"] * 2
    calls.clear()
    off = dataclasses.replace(tiny_model.config.generation, compression_ratio_threshold=None)
    results = Engine(tiny_model, generation=off).run(clips, task="asr")
    assert calls == [(2, 1.0)]
    longest = durations.index(max(durations))
    assert results[longest]["text"].startswith("a kind of a kind of")


def test_summary_tags_take_their_labels_from_the_voice_summary(tmp_path):
    """generation.summary_tags: the asked fields' labels are the summary position's own (per clip, as
    summary_labels gives them alone), the LLM's raw text is kept; a model without a summary refuses."""
    import torch

    from osum.audio import log_mel_spectrogram
    from osum.model.speech_llm import SpeechLLM
    from tests.conftest import tiny_config

    model = SpeechLLM(tiny_config("adaptor.summary_layers=[0,1]")).eval()
    with torch.no_grad():
        model.summary.proj.weight.normal_(0, 0.5)
    clips = ["examples/librivox_mister_john_dashwood.wav", "examples/asterisk_weasels_8k.wav",
             "examples/espeak_female_weather.wav", "examples/espeak_male_finance.wav"]
    alone = []
    for clip in clips:
        mel = log_mel_spectrogram(load_audio(clip)).T[None]
        alone.append(model.summary_labels(mel, torch.tensor([mel.shape[1]]), ["gender", "age"]))
        probs = model.summary_probs(mel, torch.tensor([mel.shape[1]]), "gender")  # what those labels are read off
        assert probs.sum().item() == pytest.approx(1.0)
        assert tasks.LABELS["gender"][int(probs.argmax())] == alone[-1][0]["gender"]
    assert len({row[0]["gender"] for row in alone} | {row[0]["age"] for row in alone}) > 2  # not one constant
    mels = [log_mel_spectrogram(load_audio(clip)).T for clip in clips]
    padded = torch.nn.utils.rnn.pad_sequence(mels, batch_first=True)
    lens = torch.tensor([m.shape[0] for m in mels])
    singles = torch.cat([model.summary_probs(m[None], lens[i:i + 1], "gender") for i, m in enumerate(mels)])
    torch.testing.assert_close(model.summary_probs(padded, lens, "gender"), singles, atol=1e-5, rtol=1e-4)
    tagged = dataclasses.replace(model.config.generation, summary_tags=["gender", "age"])
    results = Engine(model, max_batch_size=4, generation=tagged).run(clips, task="asr+sgc")
    plain = Engine(model, max_batch_size=4).run(clips, task="asr+sgc")
    assert [r["labels"].get("gender") for r in results] == [row[0]["gender"] for row in alone]
    assert all("age" not in r["labels"] for r in results)  # not asked by asr+sgc
    assert [r["raw"] for r in results] == [r["raw"] for r in plain]
    # the random model writes no tags: the missing gender tag is a parse error only when nothing supplies it
    missing = tasks.missing_tag_error("gender")
    assert all(missing in r["parse_errors"] for r in plain)
    assert not any(missing in r.get("parse_errors", []) for r in results)
    with pytest.raises(ValueError, match="voice summary"):
        Engine(SpeechLLM(tiny_config()), generation=tagged)
    with pytest.raises(ValueError, match="summary_tags"):
        Engine(model, generation=dataclasses.replace(tagged, summary_tags=["mood"]))


def test_engine_encodes_each_batch_once(monkeypatch):
    """Decoding and the summary's labels, or decoding and the CTC word times, of a batch share one encoder pass,
    and give what separate passes give."""
    import torch

    from osum.audio import log_mel_spectrogram
    from osum.model.speech_llm import SpeechLLM
    from tests.conftest import tiny_config

    model = SpeechLLM(tiny_config("adaptor.summary_layers=[0,1]", "generation.max_new_tokens=6")).eval()
    with torch.no_grad():
        model.summary.proj.weight.normal_(0, 0.5)
    clips = ["examples/espeak_female_weather.wav", "examples/espeak_male_finance.wav"]
    mels = [log_mel_spectrogram(load_audio(c)).T for c in clips]
    lens = torch.tensor([m.shape[0] for m in mels])
    feats = torch.nn.utils.rnn.pad_sequence(mels, batch_first=True)
    gen = dataclasses.replace(model.config.generation, summary_tags=["gender"], word_times="ctc")
    passes = []
    forward_layers = model.encoder.forward_layers
    monkeypatch.setattr(model.encoder, "forward_layers", lambda *a: passes.append(1) or forward_layers(*a))
    for task in ("asr+sgc", "srwt"):
        passes.clear()
        results = Engine(model, max_batch_size=4, generation=gen).run(clips, task=task)
        assert len(passes) == 1, task
        texts = model.generate(feats, lens, [tasks.default_prompt(task)] * 2, gen)
        assert [r["raw"] for r in results] == texts
        if task == "asr+sgc":
            alone = model.summary_labels(feats, lens, ["gender"])
            assert [r["labels"]["gender"] for r in results] == [x["gender"] for x in alone]
        else:
            alone = model.word_times(feats, lens, [tasks.parse(t, "srwt").transcript or "" for t in texts],
                                     gen.ctc_time_offsets)
            assert [len(r.get("words", [])) for r in results] == [len(w or []) for w in alone]


def test_compression_ratio_tells_a_loop_from_prose():
    prose = "Press one to record your unavailable message, press two to record your busy message."
    assert compression_ratio(prose) < 2.0 < 2.4 < compression_ratio("a kind of " * 30) and compression_ratio("") == 0


def test_frame_budget_batches():
    pieces = [Piece(i, 0.0, n / 100, np.zeros((n, 80))) for i, n in enumerate([100, 900, 500, 300, 800])]
    engine = Engine.__new__(Engine)
    engine.max_batch_size, engine.batch_frames = 3, 1800
    batches = [[p.features.shape[0] for p in b] for b in engine._batches(pieces)]
    assert batches == [[900, 800], [500, 300, 100]]  # longest first; 3 × 900 would exceed 1800 frames


def test_merge_offsets_words_and_votes_labels():
    spec = tasks.parse_spec("srwt")
    pieces = [Piece(0, 0.0, 30.0, None, "hello<0.10,0.50> world<0.60,1.00>"), Piece(0, 30.0, 5.0, None, "again<0.20,0.70>")]
    out = merge(pieces, spec)
    assert out["text"] == "hello world again"
    assert out["words"][2] == {"word": "again", "start": 30.2, "end": 30.7}
    spec = tasks.parse_spec("asr+sgc")
    texts = ["one<male>", "two<female>", "three<female>"]
    out = merge([Piece(0, 10.0 * i, 10.0, None, t) for i, t in enumerate(texts)], spec)
    assert out["text"] == "one two three" and out["labels"] == {"gender": "female"}


def test_merge_reports_unparsed_output():
    out = merge([Piece(0, 0.0, 3.0, None, "hello <joyful>")], tasks.parse_spec("asr+ser"))
    assert out["parse_errors"] and "joyful" in " ".join(out["parse_errors"])


def test_understand_api(tiny_model):
    r = tiny_model.understand(EXAMPLE, task="only:sgc")
    assert r["task"] == "only:sgc" and r["text"] is None and r["duration"] == pytest.approx(7.1, abs=0.05)
