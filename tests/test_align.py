"""CTC word times: the forced alignment against brute force, word splitting, offsets, the model and engine paths."""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from osum import tasks
from osum.audio import load_audio, log_mel_spectrogram
from osum.infer.engine import Engine, Piece, merge
from osum.model.align import align_words, fit_offsets, forced_align, word_spans

BLANK = 0


def _brute_force(log_probs: torch.Tensor, targets: list[int]) -> tuple[float, list[tuple[int, int]]]:
    """Best CTC path by enumerating every state sequence through blank-interleaved targets."""
    ext = [BLANK]
    for t in targets:
        ext += [t, BLANK]
    T, best = log_probs.shape[0], (float("-inf"), None)
    for states in itertools.product(range(len(ext)), repeat=T):
        if states[0] > 1 or states[-1] < len(ext) - 2:
            continue
        ok = all(b - a in (0, 1) or (b - a == 2 and ext[b] != BLANK and ext[b] != ext[b - 2])
                 for a, b in zip(states, states[1:]))
        if ok:
            score = sum(float(log_probs[t, ext[s]]) for t, s in enumerate(states))
            if score > best[0]:
                best = (score, states)
    spans = {}
    for t, s in enumerate(best[1]):
        if s % 2:
            spans.setdefault(s // 2, [t, t])[1] = t
    return best[0], [tuple(spans[k]) for k in range(len(targets))]


@pytest.mark.parametrize("targets", [[1, 2], [2, 2], [1, 3, 1]])
def test_forced_align_finds_the_best_path(targets):
    gen = torch.Generator().manual_seed(sum(targets))
    for _ in range(3):
        log_probs = torch.randn(6, 4, generator=gen).log_softmax(-1)
        _, expected = _brute_force(log_probs, targets)
        assert forced_align(log_probs, targets, BLANK) == expected


def test_forced_align_follows_the_spikes_and_refuses_what_cannot_fit():
    log_probs = torch.full((10, 4), -9.0)
    log_probs[:, BLANK] = -0.1
    for token, frames in ((1, [2, 3]), (2, [6]), (3, [8])):
        log_probs[frames, token] = -0.01
    assert forced_align(log_probs, [1, 2, 3], BLANK) == [(2, 3), (6, 6), (8, 8)]
    assert forced_align(log_probs[:2], [1, 1], BLANK) is None  # equal neighbours need a blank between them
    assert forced_align(log_probs[:3], [1, 1], BLANK) is not None
    assert forced_align(log_probs, [], BLANK) is None


def test_word_spans_split_at_spaces_and_cjk_characters_without_punctuation():
    text = "Frank, I didn't -- see 你好，世界 him."
    assert [w for w, _, _ in word_spans(text)] == ["Frank", "I", "didn't", "see", "你", "好", "世", "界", "him"]
    assert all(text[a:b].strip(",.，") in (w, w + "--") for w, a, b in word_spans(text))
    assert word_spans("... !") == []


class _Tokenizer:
    """One token per character (spaces included), each its own id, with offsets like a fast tokenizer's."""

    is_fast = True

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        return {"input_ids": list(range(1, len(text) + 1)), "offset_mapping": [(i, i + 1) for i in range(len(text))]}


def _spiky(targets: list[int], frames: list[int], T: int) -> torch.Tensor:
    log_probs = torch.full((T, max(targets) + 1), -9.0)
    log_probs[:, BLANK] = -0.1
    for token, frame in zip(targets, frames):
        log_probs[frame, token] = -0.01
    return log_probs


def test_align_words_times_shifts_and_bounds():
    text = "ab, c"
    ids = _Tokenizer()(text)["input_ids"]
    log_probs = _spiky(ids, [1, 3, 4, 6, 9], 12)
    words = align_words(log_probs, text, _Tokenizer(), BLANK, 0.08)
    assert words == [tasks.Word("ab", 0.08, 0.4), tasks.Word("c", 0.72, 0.8)]  # "," belongs to "ab", the space to no word
    shifted = align_words(log_probs, text, _Tokenizer(), BLANK, 0.08, offsets=(-0.1, 0.5), duration=0.9)
    assert shifted == [tasks.Word("ab", 0.0, 0.9), tasks.Word("c", 0.62, 0.9)]  # start ≥ 0, end ≤ duration
    assert align_words(log_probs[:3], text, _Tokenizer(), BLANK, 0.08) is None
    assert align_words(log_probs, "?!", _Tokenizer(), BLANK, 0.08) == []


def test_fit_offsets_is_the_median_shift_over_matching_words():
    ref = [tasks.Word("Hello", 0.2, 0.6), tasks.Word("world", 0.7, 1.2)]
    hyp = [tasks.Word("hello", 0.3, 0.5), tasks.Word("world", 0.8, 1.1)]
    other = [tasks.Word("so", 0.0, 5.0)]  # another length: left out
    assert fit_offsets([(ref, hyp), (ref[:1], other)]) == (-0.1, 0.1, 2, 0.0)
    # what the medians leave: one word 0.2 s later than the other's shift, at both ends
    late = [tasks.Word("hello", 0.3, 0.5), tasks.Word("world", 0.6, 0.9)]
    start, end, n, error_ms = fit_offsets([(ref, hyp), (ref, late)])
    assert (start, end, n) == (-0.1, 0.1, 4)
    assert error_ms == pytest.approx(50.0)  # (0.2 + 0.2) s over 4 starts and 4 ends
    with pytest.raises(ValueError, match="no reference word"):
        fit_offsets([(ref[:1], other)])


CLIPS = ["examples/librivox_mister_john_dashwood.wav", "examples/espeak_male_finance.wav"]
TEXTS = ["Mister John Dashwood had the old gentleman's promise.", "Shares rose by three percent today."]


def _features(clips):
    mels = [log_mel_spectrogram(load_audio(c)).T for c in clips]
    lens = torch.tensor([m.shape[0] for m in mels])
    return torch.nn.utils.rnn.pad_sequence(mels, batch_first=True), lens


def test_model_word_times_batch_equals_single(tiny_model):
    feats, lens = _features(CLIPS)
    batch = tiny_model.word_times(feats, lens, TEXTS, (-0.1, 0.0))
    for i, text in enumerate(TEXTS):
        (alone,) = tiny_model.word_times(feats[i:i + 1, :lens[i]], lens[i:i + 1], [text], (-0.1, 0.0))
        assert alone == batch[i]
        assert [w.word for w in alone] == [w for w, _, _ in word_spans(text)]
        assert all(0 <= w.start <= w.end <= lens[i] / 100 for w in alone)
        assert all(a.start <= b.start for a, b in zip(alone, alone[1:]))
    assert tiny_model.word_times(feats[:1, :50], lens[:1].clamp(max=50), [TEXTS[0] * 5])[0] is None
    with pytest.raises(ValueError, match="transcripts"):
        tiny_model.word_times(feats, lens, TEXTS[:1])


def test_engine_times_srwt_words_by_ctc(tiny_model):
    """word_times "ctc": each srwt result's words are the CTC alignment of its transcript; the LLM's raw text
    is unchanged and its missing spans are no parse errors; other tasks are untouched."""
    short = dataclasses.replace(tiny_model.config.generation, max_new_tokens=8)  # a text the audio can fit
    ctc = dataclasses.replace(short, word_times="ctc", ctc_time_offsets=[-0.05, 0.02])
    timed = Engine(tiny_model, max_batch_size=2, generation=ctc).run(CLIPS, task="srwt")
    plain = Engine(tiny_model, max_batch_size=2, generation=short).run(CLIPS, task="srwt")
    feats, lens = _features(CLIPS)
    for i, (t, p) in enumerate(zip(timed, plain)):
        assert t["raw"] == p["raw"] and t["text"] == p["text"]
        (words,) = tiny_model.word_times(feats[i:i + 1, :lens[i]], lens[i:i + 1],
                                         [tasks.parse(p["raw"], "srwt").transcript], [-0.05, 0.02])
        assert t["words"] and t["words"] == [dataclasses.asdict(w) for w in words]
        assert not any(tasks.is_span_error(e) for e in t.get("parse_errors", []))
    assert Engine(tiny_model, generation=ctc).run(CLIPS[:1], task="asr") == Engine(
        tiny_model, generation=short).run(CLIPS[:1], task="asr")
    (long,) = Engine(tiny_model, generation=dataclasses.replace(ctc, max_new_tokens=200)).run(CLIPS[:1], task="srwt")
    assert long["words"] == [] and any("no word times" in e for e in long["parse_errors"])  # reported, not lost


def test_merge_takes_ctc_words_and_reports_a_failed_alignment():
    spec = tasks.parse_spec("srwt")
    piece = Piece(0, 10.0, 5.0, None, "hello world<other>", words=[tasks.Word("hello", 0.1, 0.4)])
    out = merge([piece], spec)
    assert out["words"] == [{"word": "hello", "start": 10.1, "end": 10.4}] and "parse_errors" not in out
    failed = Piece(0, 0.0, 1.0, None, "hello", words=[], words_error="no word times: too long")
    assert merge([failed], spec)["parse_errors"] == ["no word times: too long"]


def test_span_errors_are_told_from_word_errors():
    errors = tasks.parse("a b<0.1,0.2> c<x> d<0.5,0.3> <1,2>", "srwt").errors
    assert len(errors) == 4 and all(tasks.is_span_error(e) for e in errors)
    assert not tasks.is_span_error("missing gender tag (one of: male, female)")


def test_export_fits_word_time_offsets(tmp_path, tiny_model, capsys):
    from osum.cli import main
    from osum.model import checkpoint

    feats, lens = _features(CLIPS)
    rows = []
    for i, (clip, text) in enumerate(zip(CLIPS, TEXTS)):
        (words,) = tiny_model.word_times(feats[i:i + 1, :lens[i]], lens[i:i + 1], [text])
        # references 0.2 s earlier to start and 0.1 s later to end than the unshifted alignment
        refs = [{"word": w.word, "start": w.start - 0.2, "end": w.end + 0.1} for w in words]
        rows.append({"key": f"u{i}", "audio": str(Path(clip).resolve()), "text": text, "words": refs})
    data = tmp_path / "fit.jsonl"
    rows.append({"key": "untimed", "audio": rows[0]["audio"], "text": TEXTS[0]})  # no words: counted, left out
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = checkpoint.save(tiny_model, tmp_path / "ckpt")
    assert main(["export", str(source), "--keep-lora", "--out", str(tmp_path / "out"), "--fit-word-times", str(data)]) == 0
    generation = json.loads((tmp_path / "out" / "config.json").read_text())["model"]["generation"]
    assert generation["word_times"] == "ctc"
    assert generation["ctc_time_offsets"] == pytest.approx([-0.2, 0.1], abs=0.002)
    err = capsys.readouterr().err
    assert "offsets fitted on" in err and "1 rows left out: no text or words" in err
    assert "mean boundary error after them 0.0 ms" in err and "warning" not in err
    # references that disagree with the alignment by half a second either way: the export warns
    for row in rows[:-1]:
        row["words"] = [{**w, "start": w["start"] + (0.5 if k % 2 else -0.5)} for k, w in enumerate(row["words"])]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["export", str(source), "--keep-lora", "--out", str(tmp_path / "out2"), "--fit-word-times", str(data)]) == 0
    assert "was the model trained with ctc_weight > 0?" in capsys.readouterr().err
