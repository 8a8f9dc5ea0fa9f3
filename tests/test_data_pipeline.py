"""Pipeline stages one by one, then build_loader: exact drop counts, determinism, rank and worker splits."""
from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

from osum import tasks
from osum.audio import SAMPLE_RATE, llm_positions
from osum.config import DataConfig, DatasetConfig, from_dict
from osum.data import pipeline as P
from osum.data.schema import Sample
from osum.data.shards import write_jsonl
from osum.data.stats import PipelineStats
from tests.data_fixtures import make_dataset, make_shards, prompt_builder, tone, wav_bytes


def item(key: str, seconds: float = 0.5, sr: int = SAMPLE_RATE, seed: int = 0, **fields) -> P.Item:
    it = P.Item(Sample(key, **fields), "d")
    it.wav, it.sample_rate = tone(seconds, np.random.default_rng(seed), sr), sr
    return it


def with_ids(it: P.Item, prompt: int, target: int) -> P.Item:
    it.prompt_ids, it.target_ids = P.PromptIds(list(range(prompt)), []), list(range(target))
    return it


# ---------------------------------------------------------------------------------------------------
# Stages alone


def test_shuffle_shards_and_split_by_part():
    shards = [f"s{i}" for i in range(10)]
    a = P.shuffle_shards(shards, P.derive_rng(0, "x"))
    assert sorted(a) == shards and a != shards and a == P.shuffle_shards(shards, P.derive_rng(0, "x"))
    parts = [list(P.split_by_part(range(11), p, 3)) for p in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    with pytest.raises(ValueError, match="part 3"):
        list(P.split_by_part([], 3, 3))


def test_read_dataset_splits_by_shard_or_by_sample(tmp_path):
    shards = make_shards(tmp_path, n=12, per_shard=4)  # 3 shards
    sources = sorted(str(p) for p in shards.glob("*.tar"))

    def keys(part: int, parts: int) -> list[str]:
        return [i.sample.key for i in P.read_dataset(sources, part, parts, PipelineStats(), "d")]

    assert keys(1, 3) == [f"shards-{i:04d}" for i in range(4, 8)]  # whole shards
    five = [keys(p, 5) for p in range(5)]  # fewer shards than parts: every 5th sample
    assert five[0] == ["shards-0000", "shards-0005", "shards-0010"]
    assert sorted(k for part in five for k in part) == [f"shards-{i:04d}" for i in range(12)]
    forced = next(P.read_dataset(sources, 0, 1, PipelineStats(), "d", task="asr"))
    assert forced.sample.task == "asr" and forced.dataset == "d"


def test_shuffle_buffer_is_a_seeded_permutation():
    out = list(P.shuffle_buffer(range(100), random.Random(1), 10))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert out == list(P.shuffle_buffer(range(100), random.Random(1), 10))
    assert list(P.shuffle_buffer(range(5), random.Random(1), 1)) == list(range(5))


def test_decode_and_resample(tmp_path, bad_audio_files):
    sf.write(tmp_path / "a.wav", tone(0.5, np.random.default_rng(0), 8000), 8000)
    items = [P.Item(Sample("path", audio=str(tmp_path / "a.wav")), "d"),
             P.Item(Sample("bytes", audio=wav_bytes(tone(0.25, np.random.default_rng(1)))), "d"),
             P.Item(Sample("gone", audio=str(tmp_path / "gone.wav")), "d"),
             P.Item(Sample("none"), "d"),
             P.Item(Sample("empty", audio=bad_audio_files[0]), "d"),
             P.Item(Sample("text", audio=bad_audio_files[1]), "d")]
    stats = PipelineStats()
    out = list(P.decode(items, stats))
    assert [(i.sample.key, i.sample_rate, len(i.wav)) for i in out] == [("path", 8000, 4000), ("bytes", 16000, 4000)]
    assert dict(stats.dropped) == {"audio_missing": 2, "audio_unreadable": 2}
    out = list(P.resample(out, SAMPLE_RATE))
    assert [(i.sample_rate, len(i.wav), i.wav.dtype) for i in out] == [(16000, 8000, np.float32),
                                                                        (16000, 4000, np.float32)]


def test_speed_perturb_changes_length_and_word_spans():
    words = [tasks.Word("hi", 0.2, 0.5)]
    out = list(P.speed_perturb([item("a", 1.0, words=words)], random.Random(0), [1.25]))[0]
    assert len(out.wav) == 12800 and out.sample.words == [tasks.Word("hi", 0.16, 0.4)]
    speeds = Counter(len(i.wav) for i in P.speed_perturb((item(str(n), 1.0) for n in range(60)),
                                                             random.Random(0), [0.9, 1.0, 1.1]))
    assert set(speeds) == {17778, 16000, 14545}


def test_filters_count_each_reason():
    stats = PipelineStats()
    items = [item("ok", 0.5), item("short", 0.05), item("stft", 0.01), item("long", 3.0)]
    assert [i.sample.key for i in P.filter_duration(items, stats, 0.1, 2.0)] == ["ok"]
    assert dict(stats.dropped) == {"too_short": 2, "too_long": 1}
    stats = PipelineStats()
    a, b, c = with_ids(item("a", 1.0), 5, 10), with_ids(item("b", 1.0), 5, 31), with_ids(item("c", 2.0), 5, 10)
    assert a.sequence_length == 5 + 2 + llm_positions(1.0) + 10 == 30
    assert [i.sample.key for i in P.filter_lengths([a, b, c], stats, 30, 40)] == ["a"]
    assert dict(stats.dropped) == {"target_too_long": 1, "sequence_too_long": 1}


def test_sequence_length_counts_the_positions_the_model_makes():
    """The length filter and batch budgets count what the model's own audio embedding makes: with other conv
    strides and a voice summary position as well as with the defaults."""
    from osum.audio import log_mel_spectrogram
    from osum.model.speech_llm import SpeechLLM
    from tests.conftest import tiny_config

    for overrides, layout in (((), P.AudioLayout((1, 2, 2), 2)),
                              (("adaptor.conv_strides=[1,2]", "adaptor.summary_layers=[0]"), P.AudioLayout((1, 2), 3))):
        cfg = tiny_config(*overrides)
        assert P.AudioLayout.of(cfg) == layout
        model = SpeechLLM(cfg).eval()
        for seconds in (0.3, 1.0, 2.37):
            it = with_ids(item("a", seconds), 5, 10)
            it.layout = layout
            mel = log_mel_spectrogram(it.wav).T[None]
            with torch.no_grad():
                _, lens = model.embed_audio(mel, torch.tensor([mel.shape[1]]))
            assert it.sequence_length == 5 + 2 + int(lens[0]) + 10  # speech begin and end around the audio
    assert P.AudioLayout().audio_positions(SAMPLE_RATE) == llm_positions(1.0)


def test_sort_buffer_orders_by_llm_sequence_then_frames():
    # A short clip with a long target (word timestamps) costs the LLM more than a longer clip with a short one.
    short_long_target = with_ids(item("words", 1.0), 5, 60)
    longer_clip = with_ids(item("asr", 2.0), 5, 10)
    same_seq_fewer_frames = with_ids(item("tie", 1.9), 5, 10 + llm_positions(2.0) - llm_positions(1.9))
    assert same_seq_fewer_frames.sequence_length == longer_clip.sequence_length
    ordered = [i.sample.key for i in P.sort_buffer([short_long_target, longer_clip, same_seq_fewer_frames], 3)]
    assert ordered == ["tie", "asr", "words"]


def test_noise_is_added_at_the_drawn_snr(tmp_path):
    (tmp_path / "noise").mkdir()
    noise = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 0.1
    sf.write(tmp_path / "noise" / "n.wav", noise, 16000)
    bank = P.NoiseBank(tmp_path / "noise")
    clean = item("a", 1.0)
    original = clean.wav.copy()
    (noisy,) = P.add_noise([clean], random.Random(0), bank, prob=1.0, snr_db=[10.0, 10.0])
    added = noisy.wav - original
    snr = 10 * np.log10(np.mean(original ** 2) / np.mean(added ** 2))
    assert snr == pytest.approx(10.0, abs=0.01)
    kept = item("b", 0.5)
    assert np.array_equal(next(P.add_noise([kept], random.Random(0), bank, 0.0, [0, 0])).wav, item("b", 0.5).wav)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no"):
        P.NoiseBank(tmp_path / "empty")


def test_features_spec_augment_sort_batch_collate():
    items = [with_ids(item(f"k{n}", s, seed=n, text="x"), 4, t) for n, (s, t) in
             enumerate([(0.9, 5), (0.3, 3), (0.6, 9), (0.5, 2), (0.4, 4)])]
    feats = list(P.compute_features(items, 80))
    assert [i.features.shape for i in feats[:2]] == [(90, 80), (30, 80)]
    before = feats[0].features.clone()
    (masked,) = P.spec_augment([feats[0]], random.Random(3), 2, 10, 2, 20)
    zero_cols = (masked.features == 0).all(0).sum().item()
    zero_rows = (masked.features == 0).all(1).sum().item()
    assert 0 < zero_cols <= 20 and 0 < zero_rows <= 40
    assert torch.equal(masked.features[masked.features != 0], before[masked.features != 0])
    feats[0].features = before
    ordered = list(P.sort_buffer(feats, 3))
    assert [i.sample.key for i in ordered] == ["k1", "k2", "k0", "k4", "k3"]  # each run of 3 sorted
    batches = list(P.dynamic_batches(ordered, max_frames=150, max_tokens=10_000, max_batch_size=10))
    assert [[i.sample.key for i in b] for b in batches] == [["k1", "k2"], ["k0"], ["k4", "k3"]]
    by_tokens = list(P.dynamic_batches(ordered, max_frames=10_000, max_tokens=2 * ordered[1].sequence_length,
                                       max_batch_size=10))
    assert all(len(b) * max(i.sequence_length for i in b) <= 2 * ordered[1].sequence_length or len(b) == 1
               for b in by_tokens)
    assert [len(b) for b in P.dynamic_batches(ordered, 10_000, 10_000, 2)] == [2, 2, 1]
    for it in ordered:
        it.spec = "asr"
    batch = P.collate(ordered[:2])
    assert batch["features"].shape == (2, 60, 80) and batch["feature_lens"].tolist() == [30, 60]
    assert torch.equal(batch["features"][0, 30:], torch.zeros(30, 80))
    assert batch["keys"] == ["k1", "k2"] and batch["tasks"] == ["asr", "asr"]
    assert batch["num_target_tokens"] == 12 and batch["audio_seconds"] == pytest.approx(0.9)
    assert batch["prompt_ids"][0] == P.PromptIds([0, 1, 2, 3], [])


# ---------------------------------------------------------------------------------------------------
# The loader


def data_config(**kw) -> DataConfig:
    base = dict(max_batch_frames=4000, max_batch_tokens=4096, sort_buffer=8, shuffle_buffer=16)
    return from_dict(DataConfig, {**base, **kw})


def test_known_bad_stream_gives_exact_counts(tmp_path, bad_audio_files):
    rng = np.random.default_rng(0)

    def wav(name: str, seconds: float) -> str:
        sf.write(tmp_path / name, tone(seconds, rng), 16000)
        return str(tmp_path / name)

    rows = [
        {"key": "good1", "audio": wav("g1.wav", 0.5), "text": "alpha", "task": "asr"},
        {"key": "good2", "audio": wav("g2.wav", 0.6), "text": "bravo", "task": "asr+ser", "emotion": "sad"},
        {"key": "missing", "audio": str(tmp_path / "nope.wav"), "text": "x"},
        {"key": "unreadable", "audio": bad_audio_files[1], "text": "x"},
        {"key": "short", "audio": wav("s.wav", 0.05), "text": "x"},
        {"key": "long", "audio": wav("l.wav", 2.5), "text": "x"},
        {"key": "nolabel", "audio": wav("n.wav", 0.5)},
        {"key": "badtext", "audio": wav("b.wav", 0.5), "text": "a <b> c"},
        {"key": "longtarget", "audio": wav("t.wav", 0.5), "text": " ".join(["word"] * 20)},
        {"key": "longseq", "audio": wav("q.wav", 1.9), "text": "x"},
        {"key": "invalid", "audio": wav("i.wav", 0.5), "text": "charlie", "task": "asr+ser", "emotion": "joyful"},
        {"key": "nogender", "audio": wav("ng.wav", 0.5), "text": "delta", "task": "asr+sgc"},
        {"key": "punct", "wav": wav("p.wav", 0.5), "txt": "hi.", "task": "<TRANSCRIBE> <PUNCTUATION>"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{oops", json.dumps({"audio": "x.wav"})]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    data = data_config(valid=[{"name": "bad", "shards": str(tmp_path / "bad.jsonl")}], max_seconds=2.0,
                       max_batch_frames=400, max_target_tokens=12, max_sequence_length=30, max_batch_tokens=60,
                       prompt_lang="en")
    loader = P.build_loader(data, "valid", prompt_builder(), 80, epoch=0)
    keys = sorted(k for b in loader for k in b["keys"])
    assert keys == ["good1", "good2", "invalid", "nogender"]
    s = loader.stats
    assert dict(s.dropped) == {
        "audio_missing": 1, "audio_unreadable": 1, "too_short": 1, "too_long": 1,
        "no_usable_target:no_text_no_label": 1, "bad_target": 1, "target_too_long": 1, "sequence_too_long": 1,
        "osum_task_unsupported:<PUNCTUATION>": 1, "bad_json": 1, "bad_record": 1}
    assert dict(s.decisions) == {"invalid_emotion_label": 1, "fallback_asr:no_emotion_label": 1,
                                 "fallback_asr:no_gender_label": 1}
    assert (s.read, s.samples) == (15, 4) and s.read == s.samples + s.num_dropped
    assert dict(s.tasks) == {"asr": 3, "asr+ser": 1}
    summary = s.summary()
    assert "dropped 11" in summary and "too_long 1" in summary and "fallback_asr:no_gender_label 1" in summary


def test_loader_batches_are_deterministic_and_complete(tmp_path):
    shards = make_shards(tmp_path, n=24, per_shard=6, tasks=("asr+ser", "srwt", "sttc", "only:sgc", "asr+sap+sgc"))
    data = data_config(train=[{"name": "s", "shards": str(shards)}], speed_perturb=[0.9, 1.0, 1.1],
                       spec_augment=True, only_x_share=0.2, combined_share=0.3, max_batch_size=5)
    prompts = prompt_builder()

    def run(epoch: int, **kw):
        return list(P.build_loader(dataclasses.replace(data, **kw), "train", prompts, 80, epoch))

    first, again = run(1), run(1)
    assert len(first) == len(again) > 1
    for a, b in zip(first, again):
        assert a["keys"] == b["keys"] and a["tasks"] == b["tasks"] and a["target_ids"] == b["target_ids"]
        assert a["prompt_ids"] == b["prompt_ids"] and torch.equal(a["features"], b["features"])
    keys = [k for b in first for k in b["keys"]]
    assert sorted(keys) == [f"shards-{i:04d}" for i in range(24)]  # one dataset: the whole epoch, once each
    assert [k for b in run(2) for k in b["keys"]] != keys  # another epoch, another order
    b = first[0]
    B = len(b["keys"])
    assert b["features"].shape[0] == B and b["features"].shape[2] == 80 and b["feature_lens"].dtype == torch.long
    assert b["features"].shape[1] == int(b["feature_lens"].max())
    assert all(ids[-1] == prompts.end_id for ids in b["target_ids"]) and B <= 5
    assert b["num_target_tokens"] == sum(len(t) for t in b["target_ids"])
    # workers: deterministic as well, and the same samples
    two = run(1, num_workers=2)
    assert [x["keys"] for x in two] == [x["keys"] for x in run(1, num_workers=2)]
    assert sorted(k for x in two for k in x["keys"]) == sorted(keys)


def test_ranks_see_disjoint_samples(tmp_path):
    jsonl = make_dataset(tmp_path, n=30, tasks=("asr", "asr+sgc"))
    for split in ("train", "valid"):
        data = data_config(**{split: [{"name": "j", "shards": str(jsonl)}]})
        seen = [[k for b in P.build_loader(data, split, prompt_builder(), 80, 0, rank, 2) for k in b["keys"]]
                for rank in (0, 1)]
        assert not set(seen[0]) & set(seen[1]), split
        assert len(seen[0]) == len(set(seen[0])) and len(seen[1]) == len(set(seen[1]))
        if split == "valid":  # each sample exactly once over the ranks (one JSONL list: split by sample)
            assert sorted(seen[0] + seen[1]) == [f"data-{i:04d}" for i in range(30)]
            assert sorted(seen[0]) == [f"data-{i:04d}" for i in range(0, 30, 2)]
    with pytest.raises(ValueError, match="rank 2"):
        P.build_loader(data, "valid", prompt_builder(), 80, 0, 2, 2)


def test_loader_config_errors(tmp_path):
    with pytest.raises(ValueError, match="lists no datasets"):
        P.build_loader(data_config(), "train", prompt_builder(), 80, 0)
    with pytest.raises(FileNotFoundError, match="no shard, list or directory"):
        P.build_loader(data_config(train=[{"name": "x", "shards": str(tmp_path / "none")}]), "train",
                       prompt_builder(), 80, 0)
    with pytest.raises(ValueError, match="unknown config key"):
        data_config(trian=[])
    with pytest.raises(ValueError, match="only_x_share"):
        data_config(only_x_share=0.7, combined_share=0.5)
    with pytest.raises(ValueError, match="max_batch_frames"):
        data_config(max_seconds=60)


def test_write_jsonl_round_trips_through_the_loader(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [Sample("solo", audio=str(make_dataset(tmp_path, n=1).parent / "wav" /
                                                                           "data-0000.wav"), text="echo")])
    (batch,) = P.build_loader(data_config(valid=[DatasetConfig("one", str(path)).__dict__]), "valid",
                              prompt_builder(), 80, 0)
    assert batch["keys"] == ["solo"] and prompt_builder().tokenizer.decode(batch["target_ids"][0][:-1]) == "echo"
    assert prompt_builder().tokenizer.decode(batch["transcript_ids"][0]) == "echo"  # for the CTC loss
