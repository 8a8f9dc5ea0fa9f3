"""`osum synth`: plan every utterance from the seed, synthesise them in parallel, write shards, eval lists and
provenance. Re-running skips utterances whose audio and metadata are already there for the same plan.

    summary = build(SynthConfig(out="data/osum-tiny", sentences=12000, jobs=2))

Layout of `out`: train/ and valid/ (synthetic, train voices), train_real/ (real recordings), each osum shards
+ manifest.json; test_synth_<family>.jsonl (held-out voices, sentences and event clips) and test_real.jsonl
(eval lists for `osum eval --data`); valid_synth.jsonl and valid_real.jsonl (the synthetic valid split and the
real recordings' valid split as eval lists, for choosing decoding settings such as `osum export
--fit-ctc-weight` without the test sets); sentences.jsonl (every sentence with its source and split);
provenance.json; mixture.yaml (a data mixture over the shard folders); train_synth_<family>.jsonl (the training
utterances of each family, for mixtures that weight families); audio/ (the per-utterance FLAC + JSON the shards
are made from, kept so a re-run can skip finished work).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import random
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from osum import fileio
from osum import tasks
from osum.data.schema import Sample
from osum.data.shards import MANIFEST, write_shards
from osum.data.stats import PipelineStats
from osum.data.synth import effects, opentext, text as textgen
from osum.data.synth.align import Aligner, timing_error
from osum.data.synth.real import MAX_SECONDS, TEST_SHARE as REAL_TEST_SHARE, VALID_SHARE as REAL_VALID_SHARE
from osum.data.synth.real import RealUtterance, real_utterances
from osum.data.synth.voices import (SAMPLE_RATE, VOICES, Speech, Voice, missing, piper_seeded, read_wav,
                                    synthesize, timing_source)

log = logging.getLogger("osum.synth")

# family -> the task its utterances are trained and tested on
FAMILIES: dict[str, str] = {"asr": "asr", "srwt": "srwt", "ser": "asr+ser", "ssr": "asr+ssr", "sap": "asr+sap",
                            "sgc": "asr+sgc", "ved": "asr+ved", "sttc": "sttc"}
TRAIN_MIX: dict[str, float] = {"asr": 0.13, "srwt": 0.08, "ser": 0.20, "ssr": 0.16, "sap": 0.16, "sgc": 0.10,
                               "ved": 0.11, "sttc": 0.06}
# Every family with its own train_synth_/test_synth_ lists: the mixed families above, and plain ASR on WordNet's
# sentences (`open`, planned apart by plan_open).
LIST_FAMILIES: dict[str, str] = {**FAMILIES, "open": "asr"}
AGE_MIX = (("adult", 0.8), ("child", 0.1), ("old", 0.1))  # outside the sap family (sap: uniform)
EXTRA_EVENT_SHARE = 0.1  # asr/sgc/sap utterances that also get an event (labelled), so ASR learns to skip them
PIPER_CHUNK, CHUNK = 24, 8  # utterances per worker task (piper loads its model once per task)
FORMAT = "osum-synth-1"

Synthesizer = Callable[[Voice, list[tuple[str, float, float]], str], list[Speech]]


@dataclass
class SynthConfig:
    out: str | Path
    sentences: int = 12000  # synthetic training utterances
    test_per_task: int = 100  # utterances in each test_synth_<family>.jsonl
    valid: int = 200  # synthetic validation utterances (train voices and sentences)
    voices: list[str] | None = None  # voice ids or engine names; None: every voice that works here
    seed: int = 0
    jobs: int = 1
    real: bool = True  # include the real recordings
    real_valid: float = REAL_VALID_SHARE  # share of the real recordings held out as valid_real.jsonl (0: none)
    # Training utterances of open-domain text (WordNet's examples, family "open", task asr), planned after and
    # apart from the rest (0 leaves every other utterance exactly as before); valid and test get their shares.
    open_sentences: int = 0
    wordnet_root: str = opentext.WORDNET_DIR
    events_root: str = effects.HEDGEWARS_VOICES
    per_shard: int = 1000


@dataclass
class Context:
    """What a worker needs; handed to each process once."""
    out: str
    voices: dict[str, Voice]
    events_root: str
    synthesizer: Synthesizer


# ---------------------------------------------------------------------------------------------------
# Voices and sentences


def select_voices(names: list[str] | None, registry: dict[str, Voice],
                  available: Callable[[Voice], str | None]) -> tuple[dict[str, Voice], dict[str, str]]:
    """(usable voices, {voice id: why not} for the rest). `names` are ids or engine names."""
    chosen = dict(registry)
    if names:
        unknown = [n for n in names if n not in registry and not any(v.engine == n for v in registry.values())]
        if unknown:
            raise ValueError(f"unknown voice(s) {unknown}; voices: {', '.join(registry)}; engines: "
                             f"{', '.join(sorted({v.engine for v in registry.values()}))}")
        chosen = {k: v for k, v in registry.items() if k in names or v.engine in names}
    usable, unusable = {}, {}
    for vid, v in chosen.items():
        why = available(v)
        if why:
            unusable[vid] = why
        else:
            usable[vid] = v
    for split in ("train", "test"):
        if not any(v.split == split for v in usable.values()):
            raise ValueError(f"no usable {split} voice among {sorted(chosen)} (not usable here: {unusable}); "
                             "run recipes/osum-tiny/install_voices.sh")
    return usable, unusable


class SentenceSource:
    """Sentences of one split, handed out without repeats until a category runs out (then reshuffled; counted)."""

    def __init__(self, pool: dict[str, list[textgen.Sentence]], split: str, rng: random.Random):
        self.rng = rng
        self.items = {c: [s for s in v if textgen.sentence_split(s) == split] for c, v in pool.items()}
        self.queues = {c: self._shuffled(c) for c in self.items}
        self.reused: Counter = Counter()

    def _shuffled(self, category: str) -> list[textgen.Sentence]:
        items = list(self.items[category])
        self.rng.shuffle(items)
        return items

    def take(self, category: str) -> textgen.Sentence:
        if not self.items.get(category):
            raise ValueError(f"no sentences of category {category!r} in this split")
        if not self.queues[category]:
            self.queues[category] = self._shuffled(category)
            self.reused[category] += 1
        return self.queues[category].pop()

    def take_any(self, accept: Callable[[textgen.Sentence], bool] = lambda s: True) -> textgen.Sentence:
        """A sentence of any style or emotion category, categories weighted by what they have left."""
        cats = [c for c in sorted(self.items) if c != "chat" and self.items[c]]
        for _ in range(200):
            weights = [len(self.queues[c]) + 1 for c in cats]
            s = self.take(self.rng.choices(cats, weights)[0])
            if accept(s):
                return s
        raise ValueError("no acceptable sentence found in 200 draws (are the words known to the aligner?)")


# ---------------------------------------------------------------------------------------------------
# The plan: one JSON-able job per utterance, fully determined by the seed, voices and clips.


def _age(rng: random.Random, family: str) -> str:
    if family == "sap":
        return rng.choice(tasks.LABELS["age"])
    if family == "srwt":
        return "adult"  # clean timing labels
    r, acc = rng.random(), 0.0
    for age, share in AGE_MIX:
        acc += share
        if r < acc:
            return age
    return "adult"


def _family_counts(total: int, mix: dict[str, float]) -> dict[str, int]:
    counts = {f: int(total * share) for f, share in mix.items()}
    counts["asr"] += total - sum(counts.values())
    return counts


def _job(rng: random.Random, key: str, split: str, family: str, voice: Voice, sentence: textgen.Sentence,
         labels: dict, prosody: effects.Prosody, event: dict | None) -> dict:
    """One utterance of the plan; draws its level, noise floor and seed from rng, in that order."""
    return {
        "key": key, "split": split, "family": family, "task": LIST_FAMILIES[family],
        "voice": voice.id, "text": sentence.text, "text_source": sentence.source,
        "category": sentence.category, "answer": sentence.answer,
        "labels": {k: v for k, v in labels.items() if v is not None},
        "prosody": prosody.to_dict(), "event": event,
        "level_db": round(effects.TARGET_DBFS + rng.uniform(-2.0, 2.0), 2),
        "noise_db": round(rng.uniform(*effects.NOISE_DBFS_RANGE), 2), "seed": rng.getrandbits(32),
    }


def make_plan(cfg: SynthConfig, voices: dict[str, Voice], pool: dict[str, list[textgen.Sentence]],
              clips: dict[str, dict[str, list[str]]], aligner: Aligner | None) -> tuple[list[dict], Counter]:
    """Every synthetic utterance of every split, and the counted planning decisions."""
    rng = random.Random(f"osum-synth-plan-{cfg.seed}")
    decisions: Counter = Counter()
    sources = {"train": SentenceSource(pool, "train", rng), "test": SentenceSource(pool, "test", rng)}
    sizes = {"train": _family_counts(cfg.sentences, TRAIN_MIX),
             "valid": _family_counts(cfg.valid, TRAIN_MIX),
             "test": {f: cfg.test_per_task for f in FAMILIES}}
    jobs = []
    for split in ("train", "valid", "test"):
        voice_split = "test" if split == "test" else "train"
        source = sources[voice_split]
        by_gender = {g: sorted(k for k, v in voices.items() if v.split == voice_split and v.gender == g)
                     for g in tasks.LABELS["gender"]}
        srwt_voices = sorted(k for k, v in voices.items() if v.split == voice_split and (
            timing_source(v) == "engine" or (timing_source(v) == "aligner" and aligner is not None)))
        split_clips = clips.get("test" if split == "test" else "train", {})
        families = [f for f, n in sizes[split].items() for _ in range(n)]
        rng.shuffle(families)
        for i, family in enumerate(families):
            if family == "ved" and not split_clips:
                decisions[f"{split}: ved utterance planned as asr (no hedgewars-data event clips)"] += 1
                family = "asr"
            gender = rng.choice([g for g in tasks.LABELS["gender"] if by_gender[g]])
            candidates = by_gender[gender]
            if family == "srwt":
                candidates = [k for k in srwt_voices if voices[k].gender == gender] or srwt_voices
                if not candidates:
                    decisions[f"{split}: srwt utterance planned as asr (no voice with word timing here)"] += 1
                    family, candidates = "asr", by_gender[gender]
            voice = voices[rng.choice(candidates)]
            age = _age(rng, family)
            emotion = style = None
            if family == "ser":
                emotion = rng.choice(textgen.EMOTIONS)
                sentence = source.take(f"emotion:{emotion}")
            elif family == "ssr":
                style = rng.choice(textgen.STYLES)
                sentence = source.take(f"style:{style}")
            elif family == "sttc":
                sentence = source.take("chat")
            elif family == "srwt" and timing_source(voice) == "aligner":
                sentence = source.take_any(lambda s: not aligner.oov(s.text))
            else:
                sentence = source.take_any()
            prosody = effects.draw_prosody(rng, voice.gender, age, emotion, style)
            event = None
            if split_clips and (family == "ved" or (family in ("asr", "sgc", "sap")
                                                    and rng.random() < EXTRA_EVENT_SHARE)):
                event = effects.draw_event(rng, split_clips).to_dict()
            labels = {"gender": voice.gender, "age": age, "emotion": emotion, "style": style,
                      "event": event["label"] if event else None, "language": "en"}
            jobs.append(_job(rng, f"{split}-{i:06d}-{family}", split, family, voice, sentence, labels, prosody, event))
    for split, source in sources.items():
        for cat, n in source.reused.items():
            decisions[f"{split}: sentences of {cat} reused (pool exhausted {n}x)"] += 1
    return jobs, decisions


def plan_open(cfg: SynthConfig, voices: dict[str, Voice], sentences: list[textgen.Sentence]) -> list[dict]:
    """The open-domain ASR utterances: cfg.open_sentences for training, valid in proportion to the grammar
    corpus's valid share, cfg.test_per_task for the test list. Their own random stream, so adding them (or more
    of them) leaves the rest of the plan unchanged; their sentences split by the same hash as the grammars'."""
    rng = random.Random(f"osum-synth-open-{cfg.seed}")
    by_split = {s: [x for x in sentences if textgen.sentence_split(x) == s] for s in ("train", "test")}
    for s in by_split.values():
        rng.shuffle(s)
    valid = round(cfg.valid * cfg.open_sentences / cfg.sentences) if cfg.sentences else 0
    sizes = {"train": cfg.open_sentences, "valid": valid, "test": cfg.test_per_task}
    if sizes["train"] + sizes["valid"] > len(by_split["train"]) or sizes["test"] > len(by_split["test"]):
        raise ValueError(f"{sizes['train']} + {sizes['valid']} train/valid and {sizes['test']} test open-domain "
                         f"utterances asked for, but WordNet gives {len(by_split['train'])} / "
                         f"{len(by_split['test'])} distinct sentences to those splits (no sentence is spoken twice)")
    jobs, used = [], {"train": 0, "test": 0}
    for split, n in sizes.items():
        voice_split = "test" if split == "test" else "train"
        by_gender = {g: sorted(k for k, v in voices.items() if v.split == voice_split and v.gender == g)
                     for g in tasks.LABELS["gender"]}
        for i in range(n):
            sentence = by_split[voice_split][used[voice_split]]
            used[voice_split] += 1
            gender = rng.choice([g for g in tasks.LABELS["gender"] if by_gender[g]])
            voice = voices[rng.choice(by_gender[gender])]
            age = _age(rng, "open")
            prosody = effects.draw_prosody(rng, voice.gender, age, None, None)
            labels = {"gender": voice.gender, "age": age, "language": "en"}
            jobs.append(_job(rng, f"{split}-open-{i:06d}", split, "open", voice, sentence, labels, prosody, None))
    return jobs


# ---------------------------------------------------------------------------------------------------
# Running one job


def _atomic_bytes(path: Path, data: bytes) -> None:
    fileio.write_bytes(path, data)


def _flac(wav: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def job_paths(out: str | Path, key: str, split: str) -> tuple[Path, Path]:
    folder = Path(out) / "audio" / split
    return folder / f"{key}.flac", folder / f"{key}.json"


def finished(out: str | Path, job: dict) -> dict | None:
    """The stored metadata of `job` when its audio and metadata exist for exactly this job, else None."""
    audio, meta = job_paths(out, job["key"], job["split"])
    if not (audio.is_file() and meta.is_file()):
        return None
    try:
        stored = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return stored if stored.get("job") == job else None


_clip_cache: dict[tuple[str, float], np.ndarray] = {}


def _shift(words: list[tasks.Word] | None, dt: float, scale: float = 1.0) -> list[tasks.Word] | None:
    if words is None:
        return None
    return [tasks.Word(w.word, round(max(0.0, w.start * scale + dt), 3), round(max(0.0, w.end * scale + dt), 3))
            for w in words]


def render(job: dict, speech: Speech, ctx: Context) -> dict:
    """Turn engine output into the labelled utterance: prosody, level, timing, event, noise. Writes it."""
    voice = ctx.voices[job["voice"]]
    p = job["prosody"]
    tempo = 1.0 if voice.engine_rate else p["rate"]
    wav, cut = effects.trim_silence(speech.wav)
    words = _shift(speech.words, -cut / SAMPLE_RATE)
    timing = "engine" if words else None
    wav = effects.apply_sox(wav, pitch_st=p["pitch_st"], tempo=tempo,
                            tremolo=tuple(p["tremolo"]) if p["tremolo"] else None)
    if words and tempo != 1.0:
        words = _shift(words, 0.0, 1.0 / tempo)
    wav = effects.set_level(wav, job["level_db"] + p["gain_db"])
    extra: dict = {"text_source": job["text_source"], "category": job["category"], "voice_engine": voice.engine,
                   "prosody": p, "family": job["family"]}
    event = job["event"]
    need_words = job["family"] == "srwt" or (event is not None and event["position"] == "inside")
    aligner = Aligner.get() if need_words else None
    if aligner is not None:
        aligned = aligner.align(wav, job["text"])
        if words is None and aligned is not None:
            words, timing = aligned, "pocketsphinx"
        elif words is not None and aligned is not None and job["family"] == "srwt":
            extra["timing_check"] = timing_error(words, aligned)  # engine timing vs forced alignment
    if event is not None:
        key = (event["clip"], event["pitch_st"])
        if key not in _clip_cache:
            _clip_cache[key] = effects.load_clip(Path(ctx.events_root) / event["clip"], event["pitch_st"])
        plan = effects.EventPlan(**event)
        ins = effects.insert_event(wav, words, _clip_cache[key], plan)
        wav, words = ins.wav, ins.words
        extra["event"] = {"clip": event["clip"], "position": event["position"], "span": list(ins.span),
                          "level_db": event["level_db"], "pitch_st": event["pitch_st"], "cut": ins.cut}
    wav = effects.add_noise(wav, np.random.default_rng(job["seed"]), job["noise_db"])
    wav, limited = effects.limit(wav)
    if limited:
        extra["limited"] = True  # peak-limited: louder emotions are capped at full scale
    task = job["task"]
    if job["family"] == "srwt" and not words:
        task = "asr"
        extra["decision"] = "srwt without word timing: trained as asr"
    if timing:
        extra["timing"] = timing
    audio, meta = job_paths(ctx.out, job["key"], job["split"])
    _atomic_bytes(audio, _flac(wav))
    sample = Sample(key=job["key"], audio=f"audio/{job['split']}/{audio.name}", sample_rate=SAMPLE_RATE,
                    duration=round(len(wav) / SAMPLE_RATE, 6), text=job["text"], task=task,
                    speaker=voice.id, words=words, answer=job["answer"], dataset="osum-synth",
                    extra=extra, **job["labels"])
    record = {"sample": sample.to_dict(), "job": job}
    _atomic_bytes(meta, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return record


def run_chunk(args: tuple[list[dict], Context]) -> list[tuple[str, dict | None, str | None, float]]:
    """Synthesise a chunk of jobs of one voice: [(key, record or None, error or None, seconds)]."""
    jobs, ctx = args
    results = []
    todo = []
    for job in jobs:
        done = finished(ctx.out, job)
        if done is not None:
            results.append((job["key"], done, None, 0.0))
        else:
            todo.append(job)
    if not todo:
        return results
    voice = ctx.voices[todo[0]["voice"]]
    # A piper process's noise follows all its lines (voices._piper), so a resumed chunk is spoken whole again
    # and only its missing utterances kept: the same audio as a build that was never stopped.
    batch = jobs if voice.engine == "piper" else todo
    workdir = tempfile.mkdtemp(prefix="osum-synth-")
    try:
        start = time.perf_counter()
        requests = [(j["text"], j["prosody"]["rate"] if voice.engine_rate else 1.0, j["prosody"]["pitch_range"])
                    for j in batch]
        try:
            speeches = ctx.synthesizer(voice, requests, workdir)
        except (RuntimeError, OSError, ValueError) as e:
            if len(batch) == 1:
                return results + [(todo[0]["key"], None, f"synthesis: {e}", 0.0)]
            speeches = None  # one bad text fails a batch: retry one at a time to find it
        per = (time.perf_counter() - start) / len(todo)  # a resumed piper chunk's whole time: spent for these
        index = {j["key"]: i for i, j in enumerate(batch)}
        for job in todo:
            i = index[job["key"]]
            t0 = time.perf_counter()
            try:
                speech = speeches[i] if speeches is not None else ctx.synthesizer(voice, [requests[i]], workdir)[0]
                if len(speech.wav) < SAMPLE_RATE // 10:
                    raise RuntimeError(f"{voice.id} produced {len(speech.wav)} samples for {job['text']!r}")
                record = render(job, speech, ctx)
                results.append((job["key"], record, None, per + time.perf_counter() - t0))
            except (RuntimeError, OSError, ValueError) as e:
                results.append((job["key"], None, f"{type(e).__name__}: {e}", 0.0))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _chunks(jobs: list[dict], voices: dict[str, Voice]) -> list[list[dict]]:
    # A piper utterance's noise depends on the other lines of its chunk (voices._piper): chunks never mix splits,
    # nor the open-domain jobs with the rest, so adding open sentences leaves every other chunk as it was.
    groups: dict[tuple[str, str, bool], list[dict]] = defaultdict(list)
    for job in jobs:
        groups[job["voice"], job["split"], job["family"] == "open"].append(job)
    out = []
    for key in sorted(groups):
        size = PIPER_CHUNK if voices[key[0]].engine == "piper" else CHUNK
        items = groups[key]
        out += [items[i: i + size] for i in range(0, len(items), size)]
    out.sort(key=lambda c: (voices[c[0]["voice"]].engine != "piper", c[0]["key"]))  # slow chunks first
    return out


# ---------------------------------------------------------------------------------------------------
# Real recordings


def render_real(utt: RealUtterance, out: Path) -> tuple[dict | None, str | None]:
    """16 kHz FLAC + record of one real utterance (skipped when already there); (record, or None and why)."""
    key = "real-" + utt.id.replace("/", "__")
    split = "real_" + utt.split
    audio, meta = job_paths(out, key, split)
    job = {"key": key, "split": split, "id": utt.id, "source": utt.path, "text": utt.text}
    done = finished(out, job)
    if done is not None:
        return done, None
    wav = read_wav(utt.path)
    if len(wav) / SAMPLE_RATE > MAX_SECONDS:
        return None, f"longer than {MAX_SECONDS:.0f} s (one encoder window)"
    _atomic_bytes(audio, _flac(wav))
    # Half the training utterances ask for the transcript only, half for transcript + gender.
    task = "asr+sgc" if utt.split == "test" or int(hashlib.sha256(key.encode()).hexdigest(), 16) % 2 else "asr"
    sample = Sample(key=key, audio=f"audio/{split}/{audio.name}", sample_rate=SAMPLE_RATE,
                    duration=round(len(wav) / SAMPLE_RATE, 6), text=utt.text, task=task, language="en",
                    gender=utt.gender, speaker=utt.corpus.split("/")[0], dataset=utt.corpus,
                    extra={"source_file": utt.path, "license": utt.license})
    record = {"sample": sample.to_dict(), "job": job}
    _atomic_bytes(meta, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return record, None


# ---------------------------------------------------------------------------------------------------
# Outputs


def _atomic_text(path: Path, text: str) -> None:
    _atomic_bytes(path, text.encode("utf-8"))


def _name_recordings(records: Iterable[dict], events_root: str) -> None:
    """Gives each inserted event its recording's digest (extra.event.recording, effects.clip_digest): two packs
    may hold one recording under two names, and a cross-validation that holds clips out must hold out both."""
    digests: dict[str, str] = {}
    for record in records:
        event = record["sample"].get("extra", {}).get("event")
        if event is not None:
            clip = event["clip"]
            if clip not in digests:
                digests[clip] = effects.clip_digest(Path(events_root) / clip)
            event["recording"] = digests[clip]


def _samples(records: list[dict], out: Path) -> list[Sample]:
    return [Sample.from_dict(r["sample"], base_dir=out) for r in records]


def _write_split_shards(records: list[dict], out: Path, name: str, per_shard: int) -> dict:
    """Shards of one split, rewritten only when its records changed (digest in the manifest folder)."""
    folder = out / name
    digest = hashlib.sha256(json.dumps([r["sample"] for r in records], sort_keys=True).encode()).hexdigest()
    stamp = folder / ".synth-digest"
    if (folder / MANIFEST).is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    manifest = write_shards(_samples(records, out), folder, per_shard=per_shard,
                            stats=PipelineStats(failures=[]), source=f"osum synth ({name})", overwrite=True)
    _atomic_text(stamp, digest + "\n")
    return manifest


def eval_row(sample: dict) -> dict:
    """An `osum eval --data` row: key, audio (relative to the list's folder), task and the references."""
    row = {k: sample[k] for k in ("key", "audio", "task", "text") if k in sample}
    for f in (*tasks.TAG_FIELDS, "words", "answer", "speaker", "duration", "dataset"):
        if f in sample:
            row[f] = sample[f]
    if sample.get("answer") is not None:
        row["question"] = sample["text"]
    return row


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    fileio.write_jsonl(path, rows)


def _counts(records: list[dict]) -> dict:
    fam, labels = Counter(), defaultdict(Counter)
    seconds = 0.0
    for r in records:
        s = r["sample"]
        fam[s.get("task")] += 1
        seconds += s.get("duration", 0.0)
        for f in tasks.TAG_FIELDS:
            if f in s:
                labels[f][s[f]] += 1
    return {"utterances": len(records), "hours": round(seconds / 3600, 3), "tasks": dict(sorted(fam.items())),
            "labels": {f: dict(sorted(c.items())) for f, c in sorted(labels.items())}}


def _timing_summary(records: list[dict]) -> dict:
    checks = [r["sample"]["extra"]["timing_check"] for r in records if "timing_check" in r["sample"].get("extra", {})]
    methods = Counter(r["sample"]["extra"].get("timing") for r in records if r["sample"].get("words"))
    out: dict = {"words_from": {str(k): v for k, v in methods.items()}}
    if checks:
        n = sum(c["words"] for c in checks)
        out["engine_vs_pocketsphinx"] = {
            "utterances": len(checks), "words": n,
            **{k: round(sum(c[k] * c["words"] for c in checks) / n, 4)
               for k in ("mean_start_error", "mean_end_error", "mean_error", "within_20ms", "within_50ms")},
            "note": "the engine's own word timing (flite -psdur, festival's Word relation) against pocketsphinx "
                    "forced alignment of the same audio (srwt utterances of those voices)",
        }
    return out


def build(cfg: SynthConfig, registry: dict[str, Voice] | None = None,
          available: Callable[[Voice], str | None] = missing, synthesizer: Synthesizer = synthesize,
          real: list[RealUtterance] | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Build the corpus in cfg.out and return the provenance (also written to provenance.json).

    registry/available/synthesizer/real replace the TTS voices and the Debian recordings (tests use fakes).
    """
    start = time.perf_counter()
    say = progress or (lambda msg: log.info(msg))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if min(cfg.sentences, cfg.test_per_task, cfg.valid, cfg.open_sentences) < 0 or cfg.jobs < 1:
        raise ValueError(f"sentences, test_per_task, valid, open_sentences must be >= 0 and jobs >= 1, got "
                         f"{cfg.sentences}, {cfg.test_per_task}, {cfg.valid}, {cfg.open_sentences}, {cfg.jobs}")
    if not 0 <= cfg.real_valid <= 1 - REAL_TEST_SHARE:
        raise ValueError(f"real_valid must be in [0, {1 - REAL_TEST_SHARE}] (the test split keeps "
                         f"{REAL_TEST_SHARE}), got {cfg.real_valid}")
    voices, unusable = select_voices(cfg.voices, registry or VOICES, available)
    clips = {s: effects.event_clips(s, cfg.events_root) for s in ("train", "test")}
    aligner = Aligner.get()
    textgen.check_grammars()
    # Enough sentences that neither split repeats one (a grammar that runs dry repeats, counted).
    categories = len(textgen.STYLES) + len(textgen.EMOTIONS)
    per_category = max(100, int(1.3 * (cfg.sentences + cfg.valid) / categories / (1 - textgen.TEST_SHARE)),
                       int(1.3 * len(FAMILIES) * cfg.test_per_task / categories / textgen.TEST_SHARE))
    pool = textgen.sentence_pool(per_category, cfg.seed)
    jobs, decisions = make_plan(cfg, voices, pool, clips, aligner)
    pools = pool
    if cfg.open_sentences:
        pools = {**pool, "open": opentext.wordnet_examples(cfg.wordnet_root)}
        jobs += plan_open(cfg, voices, pools["open"])

    # Text disjointness is the point of the split: check it on the plan itself.
    seen = defaultdict(set)
    for j in jobs:
        seen["test" if j["split"] == "test" else "train"].add(textgen.normalized(j["text"]))
    shared = seen["train"] & seen["test"]
    if shared:
        raise RuntimeError(f"{len(shared)} sentences planned in both train and test, e.g. {sorted(shared)[:3]}")

    ctx = Context(str(out), voices, cfg.events_root, synthesizer)
    chunks = _chunks(jobs, voices)
    records: dict[str, dict] = {}
    failures: list[dict] = []
    synthesized, cpu_seconds = 0, 0.0
    t_synth = time.perf_counter()
    args = [(c, ctx) for c in chunks]
    if cfg.jobs == 1:
        results = map(run_chunk, args)
        pool_ = None
    else:
        pool_ = multiprocessing.get_context("fork").Pool(cfg.jobs)
        results = pool_.imap_unordered(run_chunk, args)
    try:
        done_jobs, next_report = 0, 0.1
        for chunk_results in results:
            for key, record, error, seconds in chunk_results:
                done_jobs += 1
                if record is None:
                    failures.append({"key": key, "reason": error})
                    continue
                records[key] = record
                if seconds > 0:
                    synthesized += 1
                    cpu_seconds += seconds
            if done_jobs >= next_report * len(jobs):
                elapsed = time.perf_counter() - t_synth
                say(f"osum synth: {done_jobs}/{len(jobs)} utterances ({synthesized} synthesised, "
                    f"{len(failures)} failed, {60 * synthesized / max(elapsed, 1e-9):.0f}/min)")
                next_report += 0.1
    finally:
        if pool_ is not None:
            pool_.close()
            pool_.join()
    synth_wall = time.perf_counter() - t_synth

    real_records: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    real_skipped: Counter = Counter()
    if cfg.real:
        utts, real_skipped = (real, Counter()) if real is not None else real_utterances(cfg.real_valid)
        for utt in utts:
            record, why = render_real(utt, out)
            if record is None:
                real_skipped[f"{utt.corpus}: {why}"] += 1
            else:
                real_records[utt.split].append(record)

    _name_recordings(records.values(), cfg.events_root)
    by_split: dict[str, list[dict]] = defaultdict(list)
    for job in jobs:
        if job["key"] in records:
            by_split[job["split"]].append(records[job["key"]])
    manifests = {}
    if by_split["train"]:
        manifests["train"] = _write_split_shards(by_split["train"], out, "train", cfg.per_shard)
    if by_split["valid"]:
        manifests["valid"] = _write_split_shards(by_split["valid"], out, "valid", cfg.per_shard)
    if real_records["train"]:
        manifests["train_real"] = _write_split_shards(real_records["train"], out, "train_real", cfg.per_shard)
    for family in LIST_FAMILIES:  # the same training utterances by family, for mixtures that weight families
        rows = [r["sample"] for r in by_split["train"] if r["job"]["family"] == family]
        if rows:
            _write_jsonl(out / f"train_synth_{family}.jsonl", rows)
    test_files = {}
    for family in LIST_FAMILIES:
        rows = [eval_row(r["sample"]) for r in by_split["test"] if r["job"]["family"] == family]
        if family == "srwt":
            rows = [r for r in rows if r.get("words") and r["task"] == "srwt"]
        if rows:
            path = out / f"test_synth_{family}.jsonl"
            _write_jsonl(path, rows)
            test_files[path.name] = len(rows)
    if by_split["valid"]:
        _write_jsonl(out / "valid_synth.jsonl", [eval_row(r["sample"]) for r in by_split["valid"]])
    if real_records["valid"]:
        _write_jsonl(out / "valid_real.jsonl", [eval_row(r["sample"]) for r in real_records["valid"]])
    if real_records["test"]:
        _write_jsonl(out / "test_real.jsonl", [eval_row(r["sample"]) for r in real_records["test"]])
        test_files["test_real.jsonl"] = len(real_records["test"])
    _write_mixture(out, manifests)

    used = {split: {textgen.normalized(r["sample"]["text"]) for r in recs} for split, recs in by_split.items()}
    sentences = []
    for cat, items in pools.items():
        for s in items:
            sentences.append({"text": s.text, "category": s.category, "source": s.source,
                              "split": textgen.sentence_split(s), **({"answer": s.answer} if s.answer else {})})
    _write_jsonl(out / "sentences.jsonl", sentences)
    pool_counts = {cat: dict(Counter(textgen.sentence_split(s) for s in items)) for cat, items in pools.items()}
    total = time.perf_counter() - start
    provenance = {
        "format": FORMAT,
        "config": {"sentences": cfg.sentences, "test_per_task": cfg.test_per_task, "valid": cfg.valid,
                   "voices": cfg.voices, "seed": cfg.seed, "jobs": cfg.jobs, "real": cfg.real,
                   "real_valid": cfg.real_valid, "open_sentences": cfg.open_sentences},
        "voices": {vid: {"engine": v.engine, "name": v.name, "gender": v.gender, "split": v.split, "note": v.note,
                         **({"seeded": piper_seeded()} if v.engine == "piper" else {})}
                   for vid, v in sorted(voices.items())},
        "voices_unusable": unusable,
        "text": {
            "source": f"{textgen.SOURCE}: grammars in osum/data/synth/text.py, written for osum (Apache-2.0)",
            **({"open_source": f"{opentext.SOURCE} usage examples, {len(pools['open'])} distinct sentences of "
                               f"{opentext.MIN_WORDS}-{opentext.MAX_WORDS} words; {opentext.LICENSE}"}
               if "open" in pools else {}),
            "split_rule": f"sha256 of the normalised sentence (chat: of the fact asked about) < {textgen.TEST_SHARE}"
                          " -> test",
            "pool": pool_counts,
            "distinct_used": {k: len(v) for k, v in used.items()},
            "shared_between_train_and_test": len((used.get("train", set()) | used.get("valid", set()))
                                                 & used.get("test", set())),
            "per_sentence": "sentences.jsonl",
        },
        "events": {"source": "Debian hedgewars-data voice packs (GFDL-1.3)", "mapping": effects.EVENT_FILES,
                   "packs": effects.EVENT_PACKS,
                   "clips": {s: {k: len(v) for k, v in c.items()} for s, c in clips.items()},
                   "test_clips_left_out": effects.repeated_test_clips(cfg.events_root),
                   "labels_without_clips": sorted(set(tasks.LABELS["event"]) - set(effects.EVENT_FILES.values()))},
        "labels": {"gender": "the voice's speaker", "age": {"profiles": effects.AGE_PROFILES, "mix": dict(AGE_MIX)},
                   "emotion": effects.EMOTION_PROFILES, "style": effects.STYLE_PROFILES},
        "timestamps": _timing_summary(list(records.values())),
        "splits": {split: _counts(recs) for split, recs in sorted(by_split.items())},
        "real": {**{split: _counts(recs) for split, recs in real_records.items()},
                 "skipped": dict(real_skipped),
                 "split_rule": f"sha256 of the utterance id < {REAL_TEST_SHARE} -> test, < "
                               f"{REAL_TEST_SHARE + cfg.real_valid} -> valid; the clips in examples/ always test"},
        "test_files": test_files,
        "decisions": dict(decisions),
        "failures": failures,
        "build": {"utterances_planned": len(jobs), "synthesised_now": synthesized,
                  "reused_from_earlier_run": len(records) - synthesized, "failed": len(failures),
                  "synthesis_wall_seconds": round(synth_wall, 1), "total_seconds": round(total, 1),
                  "utterances_per_minute": round(60 * synthesized / synth_wall, 1) if synthesized else None,
                  "cpu_seconds_per_utterance": round(cpu_seconds / synthesized, 3) if synthesized else None},
    }
    _atomic_text(out / "provenance.json", json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")
    return provenance


def _write_mixture(out: Path, manifests: dict) -> None:
    lines = ["# A data mixture over this corpus (osum/data/mixture.py); weights are a starting point.", "train:"]
    if "train" in manifests:
        lines.append("  synth: {shards: train/, weight: 1.0}")
        # Each family's audio differs (event clips, emotional prosody, genre text): trained only on its own task,
        # a model can tell the task from the audio and ignore the prompt. The same shards with a task drawn
        # from each sample's labels make it read the prompt.
        lines.append("  synth-auto: {shards: train/, weight: 1.0, task: auto}")
    if "train_real" in manifests:
        # The real recordings are few: drawn 3x as often as their share against the two synthetic entries'
        # total weight of 2. (An epoch ends when one dataset runs out, so a larger weight makes epochs shorter;
        # see osum/data/mixture.py.)
        share = manifests["train_real"]["samples"] / max(1, manifests.get("train", {}).get("samples", 1))
        lines.append(f"  real: {{shards: train_real/, weight: {round(min(2.0, 6 * share), 4)}}}")
    if "valid" in manifests:
        lines += ["valid:", "  synth: {shards: valid/}"]
    _atomic_text(out / "mixture.yaml", "\n".join(lines) + "\n")
