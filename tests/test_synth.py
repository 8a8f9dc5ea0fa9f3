"""`osum synth`: sentence grammars and splits, label prosody, event insertion, timing, real-recording parsing,
and whole builds with a fake TTS engine (deterministic, re-runnable, disjoint splits). The real engines are
exercised by the tests at the end, skipped only when their programs are not installed."""
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from osum import tasks
from osum.cli import main
from osum.data.mixture import load_mixture
from osum.data.shards import read_samples, resolve_sources
from osum.data.stats import PipelineStats
from osum.data.synth import align, effects, opentext, real, text as textgen, voices
from osum.data.synth import build as build_module
from osum.data.synth.build import FAMILIES, SynthConfig, build, select_voices
from osum.evaluate.run import read_eval_set

SR = voices.SAMPLE_RATE
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "librivox_mister_john_dashwood.wav"
needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed (apt-get install sox)")


# ---------------------------------------------------------------------------------------------------
# Text


def test_pool_is_deterministic_distinct_and_split_by_hash():
    a, b = textgen.sentence_pool(60, seed=3), textgen.sentence_pool(60, seed=3)
    assert a == b
    assert set(a) == {f"style:{s}" for s in textgen.STYLES} | {f"emotion:{e}" for e in textgen.EMOTIONS} | {"chat"}
    texts = [textgen.normalized(s.text) for items in a.values() for s in items]
    assert len(texts) == len(set(texts))  # unique across categories too
    for cat, items in a.items():
        assert items, cat
        for s in items:
            assert s.category == cat and s.source.startswith(f"{textgen.SOURCE}/{cat.split(':')[0]}")
            assert s.text.lstrip('"')[0].isupper() and not any(c.isdigit() for c in s.text)
    assert len(a["style:fairy tale"]) == 60 and len(a["emotion:anger"]) == 60
    # the split depends on the text only, so it agrees across pool sizes and seeds
    c = textgen.sentence_pool(120, seed=4)
    for items in c.values():
        for s in items:
            assert textgen.sentence_split(s) == textgen.split_of(s.group or s.text)
    share = np.mean([textgen.split_of(t) == "test" for t in texts])
    assert 0.04 < share < 0.25


def test_chat_questions_of_one_fact_share_a_split_and_have_answers():
    chat = textgen.sentence_pool(10)["chat"]
    by_fact = {}
    for s in chat:
        assert s.answer and s.group
        by_fact.setdefault(s.group, set()).add(textgen.sentence_split(s))
    assert all(len(v) == 1 for v in by_fact.values())
    assert {"train", "test"} == {next(iter(v)) for v in by_fact.values()}
    assert any(s.text == "What is the capital of France?" and s.answer == "The capital of France is Paris."
               for s in chat)


def test_expand_fills_nested_slots_and_rejects_unknown_ones():
    import random

    rng = random.Random(0)
    out = textgen.expand("{a} and {b}", rng, {"a": ("x {b}",), "b": ("y",)})
    assert out == "X y and y"
    with pytest.raises(ValueError, match="nope"):
        textgen.expand("a {nope}", rng, {})


# ---------------------------------------------------------------------------------------------------
# Labels: prosody and events


def test_prosody_profiles_move_the_way_the_labels_say():
    import random

    rng = random.Random(1)
    draw = lambda **kw: [effects.draw_prosody(rng, **kw) for _ in range(50)]  # noqa: E731
    assert min(p.pitch_st for p in draw(gender="male", age="child")) >= 4.0
    old = draw(gender="female", age="old")
    assert max(p.rate for p in old) < 0.9 and all(p.tremolo for p in old)
    assert max(p.gain_db for p in draw(gender="male", emotion="sad")) < min(p.gain_db for p in draw(gender="male", emotion="anger"))
    assert max(p.pitch_range for p in draw(gender="male", emotion="sad")) < 1.0 < min(
        p.pitch_range for p in draw(gender="male", emotion="surprise"))
    assert set(effects.EMOTION_PROFILES) == set(textgen.EMOTIONS)
    assert set(effects.STYLE_PROFILES) == set(tasks.LABELS["style"])
    assert set(effects.EVENT_FILES.values()) <= set(tasks.LABELS["event"])


def _words(*spans):
    return [tasks.Word(f"w{i}", s, e) for i, (s, e) in enumerate(spans)]


@pytest.mark.parametrize("position", effects.EVENT_POSITIONS)
def test_insert_event_moves_words_by_exactly_the_inserted_audio(position):
    speech = np.full(SR * 2, 0.1, np.float32)
    words = _words((0.1, 0.5), (0.7, 1.2), (1.4, 1.9))
    clip = np.full(SR // 2, 0.3, np.float32)
    plan = effects.EventPlan("Default/Laugh.ogg", "laugh", position, level_db=0.0, pitch_st=0.0,
                             gap_before=0.25, gap_after=0.125, boundary=0.6)
    ins = effects.insert_event(speech, words, clip, plan)
    gap1, gap2 = int(0.25 * SR), int(0.125 * SR)
    extra = len(clip) + gap1 + (gap2 if position == "inside" else 0)
    assert len(ins.wav) == len(speech) + extra
    start, end = ins.span
    assert end - start == pytest.approx(0.5, abs=1e-3)
    # the clip is where the span says, at the speech's level (0 dB relative)
    seg = ins.wav[int(start * SR) + 10: int(end * SR) - 10]
    assert np.allclose(seg, 0.1, atol=1e-5)
    if position == "before":
        assert start == 0 and [w.start for w in ins.words] == pytest.approx([w.start + extra / SR for w in words])
    elif position == "after":
        assert ins.words == words and start == pytest.approx(2.0 + 0.25)
    else:
        # boundary 0.6 of two boundaries -> between w1 and w2, in the middle of their gap (1.3 s)
        assert ins.cut == "word_boundary" and start == pytest.approx(1.3 + 0.25, abs=1e-3)
        assert ins.words[:2] == words[:2]
        assert ins.words[2].start == pytest.approx(1.4 + extra / SR, abs=1e-3)
        assert ins.words[1].end <= start and ins.words[2].start >= end


def test_inside_event_without_word_timing_opens_the_quietest_frame():
    speech = np.full(SR * 2, 0.2, np.float32)
    speech[int(1.1 * SR): int(1.2 * SR)] = 0.0  # a pause
    plan = effects.EventPlan("x.ogg", "cough", "inside", 0.0, 0.0, 0.1, 0.1, 0.5)
    ins = effects.insert_event(speech, None, np.ones(800, np.float32) * 0.2, plan)
    assert ins.cut == "quietest_frame" and ins.words is None
    assert 1.1 + 0.1 <= ins.span[0] <= 1.2 + 0.1


def test_event_clip_splits_are_disjoint_packs_and_recordings(tmp_path):
    """Packs split train from test, and a test clip whose file is a training clip's (or an earlier test clip's)
    is left out of the test split, while training keeps a recording two packs share under both names."""
    tone = np.sin(np.arange(1600) / 7.0)

    def clip(path: str, scale: float) -> None:
        (tmp_path / path).parent.mkdir(exist_ok=True)
        sf.write(tmp_path / path, scale * tone, SR, format="OGG", subtype="VORBIS")

    def twin(path: str, of: str) -> None:
        (tmp_path / path).parent.mkdir(exist_ok=True)
        shutil.copy(tmp_path / of, tmp_path / path)

    clip("Default/Laugh.ogg", 0.1)
    clip("Pirate/Laugh.ogg", 0.2)
    clip("British/Laugh.ogg", 0.3)
    clip("Elsewhere/Laugh.ogg", 0.4)
    clip("Default/PoisonCough.ogg", 0.5)
    clip("Default/Jump1.ogg", 0.6)  # no event
    twin("Classic/Laugh.ogg", of="Default/Laugh.ogg")  # a training twin
    clip("Russian/PoisonCough.ogg", 0.7)
    twin("Russian_pl/PoisonCough.ogg", of="Default/PoisonCough.ogg")  # heard in training
    twin("Russian_pl/Ooff1.ogg", of="Russian/PoisonCough.ogg")  # a test twin
    train, test = effects.event_clips("train", tmp_path), effects.event_clips("test", tmp_path)
    assert train == {"cough": ["Default/PoisonCough.ogg"],
                     "laugh": ["Classic/Laugh.ogg", "Default/Laugh.ogg", "Pirate/Laugh.ogg"]}
    assert test == {"cough": ["Russian/PoisonCough.ogg"], "laugh": ["British/Laugh.ogg"]}
    assert effects.repeated_test_clips(tmp_path) == {"Russian_pl/Ooff1.ogg": "Russian/PoisonCough.ogg",
                                                      "Russian_pl/PoisonCough.ogg": "Default/PoisonCough.ogg"}
    assert effects.clip_digest(tmp_path / "Classic/Laugh.ogg") == effects.clip_digest(tmp_path / "Default/Laugh.ogg")
    assert effects.clip_digest(tmp_path / "Pirate/Laugh.ogg") != effects.clip_digest(tmp_path / "Default/Laugh.ogg")
    assert not set(effects.EVENT_PACKS["train"]) & set(effects.EVENT_PACKS["test"])


@needs_sox
def test_sox_effects_keep_or_change_duration_as_asked():
    t = np.arange(SR) / SR
    tone = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    up = effects.apply_sox(tone, pitch_st=12.0)
    assert abs(len(up) - len(tone)) < SR * 0.02
    spec = np.abs(np.fft.rfft(up[2000:-2000]))
    assert np.fft.rfftfreq(len(up) - 4000, 1 / SR)[np.argmax(spec)] == pytest.approx(400, rel=0.05)
    slow = effects.apply_sox(tone, tempo=0.5)
    assert len(slow) == pytest.approx(2 * len(tone), rel=0.02)
    assert effects.apply_sox(tone) is tone


# ---------------------------------------------------------------------------------------------------
# Timing


def test_align_sequences_and_timing_error():
    assert voices.align_sequences(list("abcd"), list("abxcd")) == [(0, 0), (1, 1), (2, 3), (3, 4)]
    assert voices.align_sequences(list("abc"), list("axc")) == [(0, 0), (1, 1), (2, 2)]
    ref = _words((0.0, 0.5), (0.5, 1.0))
    hyp = _words((0.02, 0.5), (0.56, 1.0))
    err = align.timing_error(ref, hyp)
    assert err["mean_start_error"] == pytest.approx(0.04) and err["mean_end_error"] == pytest.approx(0.0)
    assert err["within_20ms"] == 0.75 and err["within_50ms"] == 0.75
    with pytest.raises(ValueError, match="different words"):
        align.timing_error(ref, ref[:1])
    assert voices.words_of("Don't stop, Mr Smith! It's twelve.") == ["Don't", "stop", "Mr", "Smith", "It's", "twelve"]


def test_pocketsphinx_aligns_the_librivox_example():
    aligner = align.Aligner.get()
    if aligner is None:
        pytest.skip("pocketsphinx is not installed (pip install osum[synth])")
    text = (EXAMPLE.with_suffix(".txt")).read_text().strip()
    wav = voices.read_wav(EXAMPLE)
    words = aligner.align(wav, text)
    assert [w.word for w in words] == text.split()
    assert all(a.end <= b.start + 1e-6 for a, b in zip(words, words[1:]))
    assert all(w.end > w.start for w in words) and words[-1].end <= len(wav) / SR + 0.01
    assert aligner.align(wav, "zzyzxqq words") is None  # an unknown word cannot be aligned


# ---------------------------------------------------------------------------------------------------
# Real recordings


def test_asterisk_transcripts_are_normalised_or_skipped_with_a_reason():
    assert real.normalize_asterisk("press * to toggle pause, press # to enter") == (
        "press star to toggle pause, press pound to enter", "")
    assert real.normalize_asterisk("Press 1 now, or 24.")[0] == "Press one now, or twenty four."
    assert real.normalize_asterisk("[ascending tones]") == (None, "no speech (a tone or silence)")
    assert real.normalize_asterisk("dial 1234 now")[0] is None
    assert real.normalize_asterisk("at [@]")[0] == "at"
    assert [real.number_words(n) for n in (0, 13, 40, 99)] == ["zero", "thirteen", "forty", "ninety nine"]
    for uid in real.FORCED_TEST:
        assert real.split_of(uid) == "test"
    assert real.split_of("asterisk/x") == real.split_of("asterisk/x")
    ids = [f"asterisk/prompt-{i}" for i in range(4000)]
    shares = Counter(real.split_of(i) for i in ids)
    assert abs(shares["test"] / 4000 - real.TEST_SHARE) < 0.03 and abs(shares["valid"] / 4000 - real.VALID_SHARE) < 0.03
    # the valid share takes from training only: the test split is the same without it (corpora built before)
    assert [real.split_of(i, 0.0) for i in ids] == [("test" if s == "test" else "train") for s in map(real.split_of, ids)]


# ---------------------------------------------------------------------------------------------------
# Whole builds with a fake engine: per-word tone bursts with exact word timing of its own.

FAKE_VOICES = {v.id: v for v in (
    voices.Voice("fake-m", "fake", "m", "male", "train"), voices.Voice("fake-f", "fake", "f", "female", "train"),
    voices.Voice("fake-m-test", "fake", "mt", "male", "test"), voices.Voice("fake-f-test", "fake", "ft", "female", "test"),
)}


def fake_tts(voice, requests, workdir):
    out = []
    f0 = 120.0 if voice.gender == "male" else 210.0
    for text, rate, _ in requests:
        pieces, words, t = [np.zeros(int(0.1 * SR), np.float32)], [], 0.1
        for i, w in enumerate(voices.words_of(text)):
            n = int(SR * (0.06 + 0.05 * len(w)) / rate)
            x = np.arange(n) / SR
            pieces.append((0.3 * np.sin(2 * np.pi * (f0 + 7 * i) * x)).astype(np.float32))
            words.append(tasks.Word(w, round(t, 3), round(t + n / SR, 3)))
            t += n / SR + 0.05
            pieces.append(np.zeros(int(0.05 * SR), np.float32))
        out.append(voices.Speech(np.concatenate(pieces), words))
    return out


def _fake_real(tmp_path):
    utts = []
    for i, (split, gender) in enumerate((("train", "female"), ("test", "male"), ("train", "male"),
                                         ("valid", "female"))):
        path = tmp_path / f"real{i}.wav"
        sf.write(path, 0.1 * np.sin(np.arange(8000 * 2) / 8000 * 2 * np.pi * 150), 8000)  # 8 kHz, as Asterisk
        utts.append(real.RealUtterance(f"corpus/u{i}", str(path), f"real utterance {i}", gender, "fake-corpus",
                                       "test data", split))
    return utts


def _events(tmp_path):
    root = tmp_path / "events"
    rng = np.random.default_rng(0)
    for split, pack in (("train", "Default"), ("test", "British")):
        (root / pack).mkdir(parents=True)
        for stem in ("Laugh", "PoisonCough", "Hmm"):
            sf.write(root / pack / f"{stem}.ogg", 0.2 * rng.standard_normal(8000), 16000, format="OGG", subtype="VORBIS")
    return root


def _build(out, events, utts, registry=FAKE_VOICES, synthesizer=fake_tts, **kw):
    cfg = SynthConfig(out=out, sentences=kw.pop("sentences", 48), test_per_task=3, valid=4, seed=7,
                      events_root=str(events), **kw)
    return build(cfg, registry=registry, available=lambda v: None, synthesizer=synthesizer, real=utts)


# FAKE_VOICES with the male training voice spoken as piper speaks (noise drawn over each process's lines)
PIPER_VOICES = {"fake-piper": voices.Voice("fake-piper", "piper", "p", "male", "train"),
                **{k: v for k, v in FAKE_VOICES.items() if k != "fake-m"}}


@needs_sox
def test_fake_build_writes_disjoint_labelled_splits_and_reruns_for_free(tmp_path):
    events, utts = _events(tmp_path), _fake_real(tmp_path)
    out = tmp_path / "corpus"
    prov = _build(out, events, utts)
    assert prov["failures"] == [] and prov["build"]["synthesised_now"] == 48 + 4 + 3 * len(FAMILIES)
    assert prov["splits"]["train"]["utterances"] == 48 and prov["text"]["shared_between_train_and_test"] == 0
    assert prov["events"]["test_clips_left_out"] == {}  # _events' clips are distinct noise

    train = list(read_samples(resolve_sources(out / "train"), PipelineStats()))
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert len(train) == manifest["samples"] == 48
    test_rows = {f: read_eval_set(out / f"test_synth_{f}.jsonl") for f in FAMILIES}
    train_texts = {textgen.normalized(s.text) for s in train}
    for family, rows in test_rows.items():
        assert len(rows) == 3, family
        for row in rows:
            assert row["task"] == FAMILIES[family] and Path(row["audio"]).is_file()
            assert row["speaker"].endswith("-test") and textgen.normalized(row["text"]) not in train_texts
            field = {"ser": "emotion", "ssr": "style", "sap": "age", "sgc": "gender", "ved": "event"}.get(family)
            if field:
                assert row[field] in tasks.LABELS[field]
        assert textgen.split_of("x") in ("train", "test")
    assert all(r["words"] for r in test_rows["srwt"]) and all(r["answer"] and r["question"] for r in test_rows["sttc"])
    valid_rows = read_eval_set(out / "valid_synth.jsonl")  # the valid split as an eval list: train voices
    assert len(valid_rows) == 4 and all(r["text"] and Path(r["audio"]).is_file() for r in valid_rows)
    assert not any(r["speaker"].endswith("-test") for r in valid_rows)
    for s in train:
        assert not s.speaker.endswith("-test")
        assert s.gender == FAKE_VOICES[s.speaker].gender and s.language == "en"
        assert tasks.parse_spec(s.task) == tasks.parse_spec(FAMILIES[s.extra["family"]])
        spec = tasks.parse_spec(s.task)
        assert all(getattr(s, tasks.TASKS[t].field) for t in spec.tags)  # the task's labels are there
        if s.event:
            ev = s.extra["event"]
            assert ev["clip"].startswith("Default/") and ev["span"][1] <= s.duration + 1e-3
            assert ev["recording"] == effects.clip_digest(events / ev["clip"])
        if s.words:  # spans stay inside the audio and in order, after every effect and insertion
            assert all(a.start <= b.start for a, b in zip(s.words, s.words[1:])) and s.words[-1].end <= s.duration + 0.01
        assert (s.emotion is not None) == (s.extra["family"] == "ser")
    assert {s.task for s in train} >= {"asr", "srwt", "sttc", "asr+ser"}
    real_rows = read_eval_set(out / "test_real.jsonl")
    assert [(r["text"], r["gender"]) for r in real_rows] == [("real utterance 1", "male")]
    assert sf.info(real_rows[0]["audio"]).samplerate == SR
    assert json.loads((out / "train_real" / "manifest.json").read_text())["samples"] == 2
    # the real valid split: an eval list, never in the training shards
    assert [(r["text"], r["gender"]) for r in read_eval_set(out / "valid_real.jsonl")] == [("real utterance 3", "female")]
    assert prov["real"]["valid"]["utterances"] == 1
    sentences = [json.loads(line) for line in (out / "sentences.jsonl").read_text().splitlines()]
    assert all(s["source"].startswith(textgen.SOURCE) and s["split"] in ("train", "test") for s in sentences)
    mix = load_mixture(out / "mixture.yaml")
    assert [(d.name, d.task) for d in mix["train"]] == [("synth", None), ("synth-auto", "auto"), ("real", None)]
    by_family = {p.name: len(p.read_text().splitlines()) for p in out.glob("train_synth_*.jsonl")}
    assert sum(by_family.values()) == len(train) and by_family["train_synth_ved.jsonl"] > 0

    # a second run finds everything done; a second folder with 2 processes gives the same corpus
    again = _build(out, events, utts)
    assert again["build"]["synthesised_now"] == 0 and again["splits"] == prov["splits"]
    other = _build(tmp_path / "corpus2", events, utts, jobs=2)
    for meta in sorted((out / "audio" / "train").glob("*.json")):
        twin = tmp_path / "corpus2" / "audio" / "train" / meta.name
        assert json.loads(meta.read_text()) == json.loads(twin.read_text())
        assert meta.with_suffix(".flac").read_bytes() == twin.with_suffix(".flac").read_bytes()
    assert other["splits"] == prov["splits"]


@needs_sox
def test_a_new_seed_changes_only_what_the_seed_decides(tmp_path):
    events = _events(tmp_path)
    a = _build(tmp_path / "a", events, [], sentences=16, real=False)
    b = build(SynthConfig(out=tmp_path / "b", sentences=16, test_per_task=3, valid=4, seed=8, real=False,
                          events_root=str(events)), registry=FAKE_VOICES, available=lambda v: None, synthesizer=fake_tts)
    assert a["text"]["pool"] != b["text"]["pool"] or a["splits"] != b["splits"]
    assert not (tmp_path / "a" / "test_real.jsonl").exists()


def _piper_like_tts(voice, requests, workdir):
    """fake_tts plus noise drawn in one sequence over the batch, seeded by its lines, as a seeded piper draws it."""
    rng = np.random.default_rng(voices.piper_seed([t for t, _, _ in requests]))
    return [voices.Speech(s.wav + 0.01 * rng.standard_normal(len(s.wav)).astype(np.float32), s.words)
            for s in fake_tts(voice, requests, workdir)]


@needs_sox
def test_a_resumed_piper_chunk_is_spoken_whole_and_comes_out_the_same(tmp_path):
    calls = []

    def tts(voice, requests, workdir):
        calls.append((voice.id, len(requests)))
        return _piper_like_tts(voice, requests, workdir)

    events = _events(tmp_path)

    def run(out):
        return build(SynthConfig(out=out, sentences=40, test_per_task=1, valid=2, seed=3, real=False,
                                 events_root=str(events)),
                     registry=PIPER_VOICES, available=lambda v: None, synthesizer=tts)

    run(tmp_path / "a")
    spoken = sorted((tmp_path / "a" / "audio" / "train").glob("*.json"))
    piper = [m for m in spoken if json.loads(m.read_text())["sample"]["speaker"] == "fake-piper"]
    assert 2 <= len(piper) <= build_module.PIPER_CHUNK  # the training split's one piper chunk
    before = {m.name: m.with_suffix(".flac").read_bytes() for m in spoken}
    piper[1].with_suffix(".flac").unlink()
    piper[1].unlink()
    calls.clear()
    again = run(tmp_path / "a")
    assert again["build"]["synthesised_now"] == 1 and again["failures"] == []
    assert calls == [("fake-piper", len(piper))]  # the whole chunk again, for the one missing utterance
    assert {m.name: m.with_suffix(".flac").read_bytes() for m in spoken} == before


def _fake_piper_install(tmp_path, shebang):
    """A piper console script whose noise comes from onnxruntime's seed, when set (both faked on PYTHONPATH)."""
    site = tmp_path / "site"
    (site / "piper").mkdir(parents=True)
    (site / "onnxruntime.py").write_text("SEED = None\ndef set_seed(seed):\n    global SEED\n    SEED = seed\n")
    (site / "piper" / "__init__.py").write_text("")
    (site / "piper" / "__main__.py").write_text(
        "import argparse, os, random, time, wave\nimport onnxruntime\n"
        "def main():\n"
        "    p = argparse.ArgumentParser(); p.add_argument('-m'); p.add_argument('-i'); p.add_argument('-d')\n"
        "    a = p.parse_args()\n"
        "    rng = random.Random(onnxruntime.SEED if onnxruntime.SEED is not None else os.urandom(8))\n"
        "    for line in open(a.i, encoding='utf-8'):\n"
        "        frames = bytes(rng.randrange(256) for _ in range(2 * (4000 + rng.randrange(800))))\n"
        "        with wave.open(os.path.join(a.d, f'{time.monotonic_ns()}.wav'), 'wb') as w:\n"
        "            w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000); w.writeframes(frames)\n")
    exe = tmp_path / "bin" / "piper"
    exe.parent.mkdir()
    exe.write_text(f"#!{shebang}\nimport sys\nfrom piper.__main__ import main\nsys.exit(main())\n")
    exe.chmod(0o755)
    (tmp_path / "voice.onnx").write_bytes(b"")
    return site, exe


def test_piper_is_seeded_by_its_lines_through_its_own_interpreter(tmp_path, monkeypatch):
    site, exe = _fake_piper_install(tmp_path, sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("OSUM_PIPER", str(exe))
    monkeypatch.setenv("OSUM_PIPER_MODEL", str(tmp_path / "voice.onnx"))
    assert voices.piper_python(str(exe)) == sys.executable
    voice = voices.Voice("piper-x", "piper", "x", "male", "train")
    lines = [("One line.", 1.0, 1.0), ("Another line.", 1.0, 1.0)]
    first, second = (voices.synthesize(voice, lines, str(tmp_path)) for _ in range(2))
    assert [len(s.wav) for s in first] == [len(s.wav) for s in second]
    assert all(np.array_equal(a.wav, b.wav) for a, b in zip(first, second))
    other = voices.synthesize(voice, lines[::-1], str(tmp_path))  # other lines, another seed
    assert not np.array_equal(other[1].wav, first[0].wav)
    assert voices.piper_seed(["a", "b"]) == voices.piper_seed(["a", "b"]) != voices.piper_seed(["b", "a"])


def test_a_piper_that_is_no_python_script_is_run_unseeded_with_a_warning(tmp_path, monkeypatch):
    shell = tmp_path / "piper.sh"
    shell.write_text("#!/bin/sh\nexit 0\n")
    shell.chmod(0o755)
    assert voices.piper_python(str(shell)) is None
    site, exe = _fake_piper_install(tmp_path, sys.executable)
    runner = tmp_path / "bin" / "piper-bin"  # a launcher that is not a Python console script
    runner.write_text(f"#!/bin/sh\nexec {sys.executable} {exe} \"$@\"\n")
    runner.chmod(0o755)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("OSUM_PIPER", str(runner))
    monkeypatch.setenv("OSUM_PIPER_MODEL", str(tmp_path / "voice.onnx"))
    with pytest.warns(RuntimeWarning, match="cannot be seeded"):
        out = voices.synthesize(voices.Voice("piper-x", "piper", "x", "male", "train"), [("A line.", 1.0, 1.0)],
                                str(tmp_path))
    assert len(out) == 1 and len(out[0].wav) >= 4000


def test_piper_python_reads_the_launchers_pip_writes(tmp_path, monkeypatch):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    python = bin_ / "python3"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))

    def script(name, text):
        path = tmp_path / name
        path.write_bytes(text.encode("utf-8"))
        path.chmod(0o755)
        return str(path)

    launcher = "'''exec' \"{}\" \"$0\" \"$@\"\n' '''\nimport sys\n".format(python)
    assert voices.piper_python(script("direct", f"#!{python}\r\nimport sys\r\n")) == str(python)
    assert voices.piper_python(script("spaced", f"#! {python} -E\n")) == str(python)
    assert voices.piper_python(script("bom", f"\ufeff#!{python}\n")) == str(python)
    assert voices.piper_python(script("env", "#!/usr/bin/env python3\n")) == str(python)
    assert voices.piper_python(script("env-s", "#!/usr/bin/env -S python3 -u\n")) == str(python)
    assert voices.piper_python(script("pip-sh", "#!/bin/sh\n" + launcher)) == str(python)
    assert voices.piper_python(script("shell", "#!/bin/sh\nexec piper \"$@\"\n")) is None
    assert voices.piper_python(script("perl", "#!/usr/bin/perl\n")) is None
    assert voices.piper_python(str(tmp_path / "absent")) is None


def test_the_installed_piper_speaks_the_same_lines_the_same_way_twice(tmp_path):
    voice = _engine("piper-joe")
    if not voices.piper_seeded():
        pytest.skip("the piper found here is not a Python console script")
    lines = [("The wise old raven told the poor miller to follow the golden path.", 1.0, 1.0),
             ("Please send the numbers before Friday.", 1.0, 1.0)]
    first, second = (voices.synthesize(voice, lines, str(tmp_path)) for _ in range(2))
    assert all(np.array_equal(a.wav, b.wav) for a, b in zip(first, second))


def test_voice_selection_names_what_is_wrong():
    with pytest.raises(ValueError, match="unknown voice"):
        select_voices(["nobody"], FAKE_VOICES, lambda v: None)
    with pytest.raises(ValueError, match="no usable test voice"):
        select_voices(["fake-m", "fake-f"], FAKE_VOICES, lambda v: None)
    usable, unusable = select_voices(["fake"], FAKE_VOICES, lambda v: "gone" if v.id == "fake-f" else None)
    assert set(usable) == {"fake-m", "fake-m-test", "fake-f-test"} and unusable == {"fake-f": "gone"}
    for v in voices.VOICES.values():
        assert v.gender in tasks.LABELS["gender"] and v.split in ("train", "test")
    held_out = {(v.gender) for v in voices.VOICES.values() if v.split == "test"}
    assert held_out == {"male", "female"}


def test_cli_lists_voices_and_requires_out(capsys):
    assert main(["synth", "--list-voices"]) == 0
    listed = capsys.readouterr().out
    assert all(vid in listed for vid in voices.VOICES)
    assert main(["synth"]) == 2
    assert "--out is required" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The real engines (skipped only where the program is not installed)


def _engine(voice_id):
    v = voices.VOICES[voice_id]
    why = voices.missing(v)
    if why:
        pytest.skip(f"{why}: run {voices.INSTALLER}")
    return v


@pytest.mark.parametrize("voice_id", ["espeak-en-us-m1", "flite-slt"])
def test_real_engine_speaks_at_the_asked_rate(voice_id, tmp_path):
    v = _engine(voice_id)
    text = "The wise old raven told the poor miller to follow the golden path."
    normal, fast = voices.synthesize(v, [(text, 1.0, 1.0), (text, 1.5, 1.0)], str(tmp_path))
    assert 2.0 < len(normal.wav) / SR < 6.0
    assert len(fast.wav) < 0.85 * len(normal.wav)
    if v.engine == "flite":  # flite's own timing covers every word, in order, inside the audio
        assert [w.word for w in normal.words] == voices.words_of(text)
        assert all(a.end <= b.start + 1e-6 for a, b in zip(normal.words, normal.words[1:]))
        assert normal.words[-1].end <= len(normal.wav) / SR
        aligner = align.Aligner.get()
        if aligner is not None:  # the two timing methods agree to a few tens of milliseconds
            err = align.timing_error(normal.words, aligner.align(normal.wav, text))
            assert err["mean_error"] < 0.04


def _wordnet(tmp_path):
    """A WordNet-shaped data file: a license header line, then synsets whose glosses quote usage examples."""
    root = tmp_path / "wordnet"
    root.mkdir()
    lines = ["  1 This software and database is being provided to you \"as is\" by Princeton"]
    numbers = "one two three four five".split()
    for i in range(60):
        example = f"the keeper number {numbers[i % 5]} opened gate {i // 5 * 'x' or 'zero'} at dawn"
        lines.append(f"{i:08d} 00 n 01 word{i} 0 000 | a gloss; \"{example}\"; \"too short\"; "
                     "\"it has 3 digits in it, sadly\"")
    lines.append("00000999 00 v 01 dup 0 000 | again; \"The keeper number one opened gate zero at dawn.\"")
    (root / "data.noun").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return root


def test_wordnet_examples_keep_distinct_clean_sentences_with_provenance(tmp_path):
    sentences = opentext.wordnet_examples(_wordnet(tmp_path))
    # 60 distinct usable examples; the header, the short ones, the ones with digits and the repeat are left out
    assert len(sentences) == 60 and len({textgen.normalized(s.text) for s in sentences}) == 60
    assert sentences[0].text == "The keeper number one opened gate zero at dawn."
    assert all(s.category == "open" and s.source.startswith("wordnet-3.0/data.noun:") for s in sentences)
    assert sentences[1].source == "wordnet-3.0/data.noun:00000001#0"
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        opentext.wordnet_examples(tmp_path / "nowhere")


@needs_sox
@pytest.mark.parametrize("piper", [False, True])
def test_open_sentences_add_their_family_and_leave_the_rest_of_the_corpus_alone(tmp_path, piper):
    events, root = _events(tmp_path), _wordnet(tmp_path)
    voices_ = {"registry": PIPER_VOICES, "synthesizer": _piper_like_tts} if piper else {}
    base = _build(tmp_path / "a", events, [], sentences=16, real=False, **voices_)
    prov = _build(tmp_path / "b", events, [], sentences=16, real=False, open_sentences=8, wordnet_root=str(root),
                  **voices_)
    assert prov["failures"] == [] and prov["text"]["shared_between_train_and_test"] == 0
    for meta in sorted((tmp_path / "a" / "audio").glob("*/*.json")):  # every other utterance as without them
        twin = tmp_path / "b" / meta.relative_to(tmp_path / "a")
        assert json.loads(meta.read_text()) == json.loads(twin.read_text())
        assert meta.with_suffix(".flac").read_bytes() == twin.with_suffix(".flac").read_bytes()
    if piper:  # the piper voice speaks both kinds of training utterance, in chunks of their own
        spoken = [json.loads(m.read_text())["sample"] for m in (tmp_path / "b" / "audio" / "train").glob("*.json")]
        assert {s["extra"]["family"] == "open" for s in spoken if s["speaker"] == "fake-piper"} == {True, False}
        assert prov["voices"]["fake-piper"]["seeded"] == voices.piper_seeded()
    train = list(read_samples(resolve_sources(tmp_path / "b" / "train"), PipelineStats()))
    opened = [s for s in train if s.extra["family"] == "open"]
    assert len(train) == 16 + 8 and len(opened) == 8 and {s.task for s in opened} == {"asr"}
    assert all(s.extra["text_source"].startswith("wordnet-3.0/") for s in opened)
    test_rows = read_eval_set(tmp_path / "b" / "test_synth_open.jsonl")
    assert len(test_rows) == 3 and all(r["speaker"].endswith("-test") and r["task"] == "asr" for r in test_rows)
    assert not {textgen.normalized(r["text"]) for r in test_rows} & {textgen.normalized(s.text) for s in train}
    assert len((tmp_path / "b" / "train_synth_open.jsonl").read_text().splitlines()) == 8
    assert prov["config"]["open_sentences"] == 8 and "wordnet-3.0" in prov["text"]["open_source"]
    assert prov["splits"]["test"]["tasks"]["asr"] == base["splits"]["test"]["tasks"]["asr"] + 3
    assert prov["splits"]["valid"]["utterances"] == base["splits"]["valid"]["utterances"] + 2  # 4 x 8 / 16
    with pytest.raises(ValueError, match="WordNet gives"):
        _build(tmp_path / "c", events, [], sentences=16, real=False, open_sentences=500, wordnet_root=str(root))
