"""Labels made audible: prosody profiles for age, emotion and style; sox effects; vocal-event clips from
hedgewars-data inserted before, inside (at a word boundary) or after speech.

    prosody = draw_prosody(rng, "female", age="old", emotion="sad")
    wav = apply_sox(wav, pitch_st=-2.0, tempo=0.85, tremolo=(5.0, 30.0))
    inserted = insert_event(speech, words, clip, draw_event(rng, event_clips("train")))  # .wav .words .span
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from osum import tasks
from osum.data.synth.voices import SAMPLE_RATE, read_wav

# ---------------------------------------------------------------------------------------------------
# Prosody. rate: engine speaking rate (piper: sox tempo); pitch_st: mean pitch shift in semitones (sox
# `pitch`, which moves the formants with it, as a shorter or longer vocal tract does); pitch_range: the
# intonation range (espeak/mbrola only); gain_db: loudness; tremolo: (Hz, depth %) amplitude shake.


@dataclass
class Prosody:
    rate: float = 1.0
    pitch_st: float = 0.0
    pitch_range: float = 1.0
    gain_db: float = 0.0
    tremolo: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tremolo"] = list(self.tremolo) if self.tremolo else None
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


# (low, high) uniform ranges. Ages: children speak higher (+4..+7 st, formants up with it) and a little
# faster or slower; old voices are slower, shaky (tremolo) and lower for women, about level for men.
AGE_PROFILES: dict[str, dict[str, tuple[float, float]]] = {
    "child": {"pitch_st": (4.0, 7.0), "rate": (0.9, 1.15)},
    "adult": {"pitch_st": (-1.0, 1.0), "rate": (0.92, 1.08)},
    "old": {"pitch_st": (-2.5, 0.5), "rate": (0.72, 0.88), "tremolo_hz": (4.0, 6.5), "tremolo_depth": (20.0, 45.0)},
}
# Emotions (multiplied onto / added to the age's values): rate, pitch, range, loudness, shake.
EMOTION_PROFILES: dict[str, dict[str, tuple[float, float]]] = {
    "neutral": {"rate": (0.97, 1.03), "pitch_st": (0.0, 0.0), "pitch_range": (0.9, 1.1), "gain_db": (-1.0, 1.0)},
    "happy": {"rate": (1.05, 1.18), "pitch_st": (1.5, 3.0), "pitch_range": (1.5, 2.0), "gain_db": (2.0, 4.0)},
    "sad": {"rate": (0.72, 0.85), "pitch_st": (-3.0, -1.5), "pitch_range": (0.3, 0.6), "gain_db": (-8.0, -5.0)},
    "anger": {"rate": (1.08, 1.2), "pitch_st": (0.5, 2.0), "pitch_range": (1.3, 1.7), "gain_db": (5.0, 8.0)},
    "fear": {"rate": (1.12, 1.28), "pitch_st": (2.5, 4.0), "pitch_range": (1.1, 1.4), "gain_db": (-3.0, -1.0),
             "tremolo_hz": (6.0, 9.0), "tremolo_depth": (25.0, 45.0)},
    "surprise": {"rate": (0.95, 1.08), "pitch_st": (3.0, 5.0), "pitch_range": (1.8, 2.5), "gain_db": (1.0, 3.0)},
    "disgust": {"rate": (0.8, 0.9), "pitch_st": (-2.0, -0.5), "pitch_range": (0.6, 0.8), "gain_db": (-1.0, 1.0)},
}
# Styles are carried by their text; the prosody only leans the way the genre is usually read.
STYLE_PROFILES: dict[str, dict[str, tuple[float, float]]] = {
    "news & science": {"rate": (1.0, 1.1), "pitch_range": (0.9, 1.1)},
    "horror story": {"rate": (0.8, 0.9), "pitch_st": (-2.0, -1.0), "pitch_range": (0.7, 0.9), "gain_db": (-5.0, -3.0)},
    "fairy tale": {"rate": (0.85, 0.95), "pitch_st": (0.5, 1.5), "pitch_range": (1.4, 1.8)},
    "customer service": {"rate": (1.0, 1.1), "pitch_st": (0.5, 1.5), "pitch_range": (1.1, 1.3), "gain_db": (0.0, 2.0)},
    "poetry & prose": {"rate": (0.8, 0.9), "pitch_range": (1.2, 1.4)},
    "audiobook": {"rate": (0.92, 1.0), "pitch_range": (1.0, 1.2)},
    "conversation": {"rate": (1.05, 1.15), "pitch_range": (1.1, 1.3)},
    "other": {"rate": (0.95, 1.05)},
}


def _u(rng: random.Random, profile: dict, name: str, default: float) -> float:
    lo, hi = profile.get(name, (default, default))
    return rng.uniform(lo, hi)


def draw_prosody(rng: random.Random, gender: str, age: str = "adult", emotion: str | None = None,
                 style: str | None = None) -> Prosody:
    """Prosody for one utterance: the age's, then the emotion's or style's on top."""
    a = AGE_PROFILES[age]
    pitch = _u(rng, a, "pitch_st", 0.0)
    if age == "old" and gender == "male":
        pitch = abs(pitch) * 0.4  # men's voices rise a little with age, women's fall
    p = Prosody(rate=_u(rng, a, "rate", 1.0), pitch_st=pitch)
    shake = (_u(rng, a, "tremolo_hz", 0.0), _u(rng, a, "tremolo_depth", 0.0)) if "tremolo_hz" in a else None
    extra = EMOTION_PROFILES[emotion] if emotion else STYLE_PROFILES[style] if style else {}
    p.rate *= _u(rng, extra, "rate", 1.0)
    p.pitch_st += _u(rng, extra, "pitch_st", 0.0)
    p.pitch_range = _u(rng, extra, "pitch_range", 1.0)
    p.gain_db = _u(rng, extra, "gain_db", 0.0)
    if "tremolo_hz" in extra:
        shake = (_u(rng, extra, "tremolo_hz", 0.0), _u(rng, extra, "tremolo_depth", 0.0))
    p.tremolo = shake
    return p


# ---------------------------------------------------------------------------------------------------
# Signal helpers

TARGET_DBFS = -22.0  # speech level before the emotion's gain


def have_sox() -> bool:
    return shutil.which("sox") is not None


def apply_sox(wav: np.ndarray, pitch_st: float = 0.0, tempo: float = 1.0,
              tremolo: tuple[float, float] | None = None) -> np.ndarray:
    """Pitch shift (keeps duration), tempo change (keeps pitch) and tremolo, by sox on raw float samples."""
    effects: list[str] = []
    if abs(pitch_st) > 1e-3:
        effects += ["pitch", f"{100 * pitch_st:.1f}"]
    if abs(tempo - 1.0) > 1e-3:
        effects += ["tempo", "-s", f"{tempo:.4f}"]
    if tremolo:
        effects += ["tremolo", f"{tremolo[0]:.2f}", f"{tremolo[1]:.1f}"]
    if not effects:
        return wav
    if not have_sox():
        raise RuntimeError("sox is not installed; it makes the age, emotion and style prosody "
                           "(apt-get install sox, or recipes/osum-tiny/install_voices.sh)")
    fmt = ["-t", "f32", "-r", str(SAMPLE_RATE), "-c", "1"]
    proc = subprocess.run(["sox", "-V1", *fmt, "-", *fmt, "-", *effects], input=wav.astype("<f4").tobytes(),
                          capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"sox {' '.join(effects)} failed: {proc.stderr.decode(errors='replace')[-300:]}")
    return np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)


def rms_db(wav: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(np.square(wav, dtype=np.float64))) + 1e-9))


def set_level(wav: np.ndarray, dbfs: float) -> np.ndarray:
    return (wav * 10 ** ((dbfs - rms_db(wav)) / 20)).astype(np.float32)


def trim_silence(wav: np.ndarray, threshold_db: float = -45.0, keep: float = 0.02) -> tuple[np.ndarray, int]:
    """`wav` without leading/trailing stretches below threshold_db of its peak; (trimmed, samples cut at the start)."""
    if len(wav) == 0:
        return wav, 0
    frame = int(0.01 * SAMPLE_RATE)
    n = len(wav) // frame
    if n == 0:
        return wav, 0
    energy = np.sqrt(np.mean(wav[: n * frame].reshape(n, frame) ** 2, axis=1))
    loud = np.nonzero(energy > np.max(energy) * 10 ** (threshold_db / 20))[0]
    if len(loud) == 0:
        return wav, 0
    pad = int(keep * SAMPLE_RATE)
    start = max(0, loud[0] * frame - pad)
    end = min(len(wav), (loud[-1] + 1) * frame + pad)
    return wav[start:end], start


# ---------------------------------------------------------------------------------------------------
# Vocal events: hedgewars-data voice packs (GFDL-1.3). Files mapped to our labels where the sound really is
# that event. "Ow"/"Nooo" are yelled exclamations: screaming is the nearest class. Hmm (a hum), Ooff (a
# grunt when hit) and PoisonMoan (a moan) are "other". Nothing in the packs is a cry, sigh, throat
# clearing or sneeze, so those labels get no data (a documented gap).

HEDGEWARS_VOICES = "/usr/share/games/hedgewars/Data/Sounds/voices"
EVENT_FILES: dict[str, str] = {
    "Laugh": "laugh", "PoisonCough": "cough", "Nooo": "screaming", "Ow1": "screaming", "Ow2": "screaming",
    "Ow3": "screaming", "Ow4": "screaming", "Hmm": "other", "Ooff1": "other", "Ooff2": "other", "Ooff3": "other",
    "PoisonMoan": "other",
}
EVENT_PACKS = {
    "train": ("Default", "Default_es", "Default_pl", "Default_uk", "Classic", "Mobster", "Pirate", "Robot",
              "Singer", "Surfer"),
    "test": ("British", "Default_ru", "HillBilly", "Russian", "Russian_pl"),
}
EVENT_POSITIONS = ("before", "inside", "after")


def clip_digest(path: str | os.PathLike) -> str:
    """What identifies a clip's recording: the first 16 hex digits of its file's sha256. The packs share some
    recordings under different pack names (Classic's are Default's; Russian_pl's PoisonCough is Default_pl's),
    so a clip's path does not say whether two clips are one sound."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _pack_clips(split: str, root: str | os.PathLike) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for pack in EVENT_PACKS[split]:
        for stem, label in EVENT_FILES.items():
            if (Path(root) / pack / f"{stem}.ogg").is_file():
                out.setdefault(label, []).append(f"{pack}/{stem}.ogg")
    return {k: sorted(v) for k, v in sorted(out.items())}


def repeated_test_clips(root: str | os.PathLike = HEDGEWARS_VOICES) -> dict[str, str]:
    """test clip -> the clip it repeats, for each test-pack clip whose file is byte for byte a training-pack clip
    or an earlier test clip (sorted order): the clips event_clips("test") leaves out."""
    seen = {clip_digest(Path(root) / c): c for clips in _pack_clips("train", root).values() for c in clips}
    repeats = {}
    for clip in sorted(c for clips in _pack_clips("test", root).values() for c in clips):
        digest = clip_digest(Path(root) / clip)
        if digest in seen:
            repeats[clip] = seen[digest]
        else:
            seen[digest] = clip
    return repeats


def event_clips(split: str, root: str | os.PathLike = HEDGEWARS_VOICES) -> dict[str, list[str]]:
    """label -> clip paths relative to `root` ("Pirate/Laugh.ogg") of one split's voice packs, sorted. The test
    split leaves out every clip whose recording training has (repeated_test_clips); the training split
    keeps a recording two packs share under both names (clip_digest groups them where that matters)."""
    clips = _pack_clips(split, root)
    if split == "test":
        repeats = repeated_test_clips(root)
        clips = {k: [c for c in v if c not in repeats] for k, v in clips.items()}
    return {k: v for k, v in clips.items() if v}


@dataclass
class EventPlan:
    clip: str  # relative to the hedgewars voices folder
    label: str
    position: str  # before | inside | after
    level_db: float  # clip RMS relative to the speech RMS
    pitch_st: float  # by resampling: the clip gets shorter as it gets higher, as a smaller body would make it
    gap_before: float  # seconds of silence between clip and speech
    gap_after: float
    boundary: float  # inside: which word boundary, as a fraction of the boundaries (0..1)

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def draw_event(rng: random.Random, clips: dict[str, list[str]], label: str | None = None) -> EventPlan:
    label = label or rng.choice(sorted(clips))
    return EventPlan(clip=rng.choice(clips[label]), label=label, position=rng.choice(EVENT_POSITIONS),
                     level_db=rng.uniform(-8.0, 2.0), pitch_st=rng.uniform(-3.0, 3.0),
                     gap_before=rng.uniform(0.05, 0.35), gap_after=rng.uniform(0.05, 0.35),
                     boundary=rng.random())


def load_clip(path: str | os.PathLike, pitch_st: float = 0.0) -> np.ndarray:
    """A clip at 16 kHz mono, silence trimmed, pitch moved by resampling."""
    wav, _ = trim_silence(read_wav(path))
    if abs(pitch_st) > 1e-3:
        import soxr

        factor = 2 ** (pitch_st / 12)
        wav = soxr.resample(wav, SAMPLE_RATE * factor, SAMPLE_RATE).astype(np.float32)
    return wav


def _cut_point(wav: np.ndarray, words: list[tasks.Word] | None, boundary: float) -> tuple[int, str]:
    """Where to open the speech for an inside event: the middle of a gap between two words, or (without word
    timing) the quietest 20 ms in the middle 60 % of the speech. Returns (sample, how)."""
    if words and len(words) >= 2:
        k = min(int(boundary * (len(words) - 1)), len(words) - 2)
        t = (words[k].end + words[k + 1].start) / 2
        return int(round(t * SAMPLE_RATE)), "word_boundary"
    frame = int(0.02 * SAMPLE_RATE)
    lo, hi = int(0.2 * len(wav)), int(0.8 * len(wav))
    n = (hi - lo) // frame
    if n < 1:
        return len(wav) // 2, "middle"
    energy = np.mean(wav[lo: lo + n * frame].reshape(n, frame) ** 2, axis=1)
    return lo + int(np.argmin(energy)) * frame + frame // 2, "quietest_frame"


@dataclass
class Inserted:
    wav: np.ndarray
    words: list[tasks.Word] | None
    span: tuple[float, float]  # where the event is, seconds
    cut: str  # how the inside cut point was found ("" for before/after)
    extra: dict = field(default_factory=dict)


def insert_event(speech: np.ndarray, words: list[tasks.Word] | None, clip: np.ndarray, plan: EventPlan) -> Inserted:
    """Speech with the event clip placed per `plan`; word spans moved by the inserted length."""
    level = rms_db(speech) + plan.level_db
    clip = set_level(clip, level) if len(clip) else clip
    gap1 = np.zeros(int(plan.gap_before * SAMPLE_RATE), np.float32)
    gap2 = np.zeros(int(plan.gap_after * SAMPLE_RATE), np.float32)
    cut, how = 0, ""
    if plan.position == "before":
        cut = 0
        pieces = [clip, gap1, speech]
        ev_start = 0
    elif plan.position == "after":
        cut = len(speech)
        pieces = [speech, gap1, clip]
        ev_start = len(speech) + len(gap1)
    elif plan.position == "inside":
        cut, how = _cut_point(speech, words, plan.boundary)
        pieces = [speech[:cut], gap1, clip, gap2, speech[cut:]]
        ev_start = cut + len(gap1)
    else:
        raise ValueError(f"event position must be one of {EVENT_POSITIONS}, got {plan.position!r}")
    wav = np.concatenate(pieces).astype(np.float32)
    inserted = len(wav) - len(speech)
    shift = inserted / SAMPLE_RATE
    cut_s = cut / SAMPLE_RATE
    moved = None
    if words is not None:
        if plan.position == "before":
            moved = [tasks.Word(w.word, round(w.start + shift, 3), round(w.end + shift, 3)) for w in words]
        elif plan.position == "after":
            moved = list(words)
        else:
            moved = [w if w.end <= cut_s + 1e-6 else tasks.Word(w.word, round(w.start + shift, 3), round(w.end + shift, 3))
                     for w in words]
    span = (round(ev_start / SAMPLE_RATE, 3), round((ev_start + len(clip)) / SAMPLE_RATE, 3))
    return Inserted(wav, moved, span, how)


# The noise floor's level range (dBFS) a synthesised utterance draws from.
NOISE_DBFS_RANGE = (-68.0, -50.0)


def add_noise(wav: np.ndarray, rng: np.random.Generator, dbfs: float) -> np.ndarray:
    """A faint noise floor (TTS output is digitally silent between words; real recordings never are)."""
    return (wav + rng.standard_normal(len(wav)).astype(np.float32) * 10 ** (dbfs / 20)).astype(np.float32)


def limit(wav: np.ndarray, peak: float = 0.98) -> tuple[np.ndarray, bool]:
    """Scale down so the peak is at most `peak`; (audio, whether it was scaled)."""
    top = float(np.max(np.abs(wav), initial=0.0))
    if top <= peak:
        return wav, False
    return (wav * (peak / top)).astype(np.float32), True
