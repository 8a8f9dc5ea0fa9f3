"""What would vocal-event recordings from other sources add to the event head? A check to run before building
them into the corpus.

Each given clip is inserted into training speech as `osum synth` inserts the hedgewars clips (its `draw_event`
plan: position, level, pitch, gaps; a word-boundary cut inside the speech of the training split's `srwt`
utterances), `--per` times. The released frame locator stays as it is; the event head is fitted again on the
training split's event utterances plus the new ones and scored two ways:

- held out by recording: 5-fold, each recording's utterances in one fold (the new clips' too), scored on the
  hedgewars training utterances only, so that the row without new clips is the export's own estimate;
- on the held-out packs' test list (other hedgewars characters, never trained on).

It prints a row without new clips, one with each label's clips alone and one with all. Without `--clips` it
reads the human sound effects of a few Debian packages (`apt-get install scratch tuxpaint-data trackballs-data
crossfire-client btanks-data`; CC-BY-SA-3.0 and GPL), about 4 min on 2 CPU cores:

    python recipes/osum-tiny/event_sources.py --model osum-tiny --data data/osum-tiny
    python recipes/osum-tiny/event_sources.py --clips laugh='my_laughs/*.wav' --clips cough=my_cough.flac

With `--write LIST.jsonl` it scores nothing: it writes the utterances (audio in a folder named after the list,
beside it) and their list, for `osum export --fit-tag-heads event=LIST.jsonl` to fit the head on them too
(recipe stage 6 does with Scratch's coughs, `apt-get install scratch`):

    python recipes/osum-tiny/event_sources.py --clips cough='/usr/share/scratch/Media/Sounds/Human/Cough-*.wav' \
        --write data/osum-tiny/train_extra_ved.jsonl
"""
from __future__ import annotations

import argparse
import glob
import random
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import osum
from osum import audio as A
from osum import tasks
from osum.data.synth import effects
from osum.evaluate.run import read_eval_set
from osum.fileio import write_jsonl
from osum.model.tag_heads import cross_validate, fit_linear, pooled_stats

FIELD = "event"
GROUP = "recording"
# Human sound effects shipped in Debian packages (file → package), by the label `osum synth` would give them.
DEBIAN_CLIPS = {
    "laugh": {f"/usr/share/scratch/Media/Sounds/Human/{n}": "scratch"
              for n in ("Laugh-female.wav", "Laugh-male1.wav", "Laugh-male2.wav", "Laugh-male3.mp3")}
    | {"/usr/share/tuxpaint/sounds/giggle.wav": "tuxpaint-data",
       "/usr/share/games/trackballs/sfx/crazylaugh.wav": "trackballs-data",
       "/usr/share/games/trackballs/sfx/evillaugh.wav": "trackballs-data",
       "/usr/share/games/crossfire-client/sounds/Evil_Laugh.wav": "crossfire-client"},
    "cough": {f"/usr/share/scratch/Media/Sounds/Human/{n}": "scratch" for n in ("Cough-female.wav", "Cough-male.wav")},
    "screaming": {f"/usr/share/scratch/Media/Sounds/Human/{n}": "scratch"
                  for n in ("Scream-female.wav", "Scream-male1.wav", "Scream-male2.mp3")}
    | {"/usr/share/games/btanks/data/sounds/kamikaze-scream.ogg": "btanks-data"},
}


def parse_clips(specs: list[str]) -> dict[str, list[str]]:
    """`LABEL=GLOB` arguments → label → sorted files; the Debian clips without any. Errors name what is wrong."""
    if not specs:
        missing = sorted({pkg for files in DEBIAN_CLIPS.values() for f, pkg in files.items() if not Path(f).is_file()})
        if missing:
            raise SystemExit(f"the default clips come from Debian packages not installed here: apt-get install "
                             f"{' '.join(missing)} (or name clips with --clips LABEL=GLOB)")
        return {label: sorted(files) for label, files in DEBIAN_CLIPS.items()}
    clips: dict[str, list[str]] = {}
    for spec in specs:
        label, sep, pattern = spec.partition("=")
        if not sep or not pattern:
            raise SystemExit(f"--clips {spec!r}: expected LABEL=GLOB, e.g. laugh='laughs/*.wav'")
        if label not in tasks.LABELS[FIELD]:
            raise SystemExit(f"--clips {spec!r}: {label!r} is not an event label ({', '.join(tasks.LABELS[FIELD])})")
        files = sorted(glob.glob(pattern))
        if not files:
            raise SystemExit(f"--clips {spec!r}: no file matches {pattern!r}")
        clips[label] = sorted({*clips.get(label, []), *files})
    return clips


def read_rows(data: Path, name: str) -> list[dict]:
    """An `osum synth` list (read_eval_set: audio paths made absolute), or a clear exit when it is missing."""
    if not (data / name).is_file():
        raise SystemExit(f"{data / name}: not found (build the corpus first: recipe stage 1)")
    return read_eval_set(data / name)


def insert_clips(clips: dict[str, list[str]], speech: list[dict], per: int, out: Path, seed: int) -> list[dict]:
    """`per` utterances for each clip: training speech with the clip inserted by an `osum synth` plan, written
    to `out`; rows as the corpus writes them, grouped by the clip file's digest."""
    rng, rows = random.Random(seed), []
    for label, files in sorted(clips.items()):
        for path in files:
            digest = effects.clip_digest(path)
            for k in range(per):
                plan = effects.draw_event(rng, {label: [path]}, label)
                row = rng.choice(speech)
                words = [tasks.Word(w["word"], w["start"], w["end"]) for w in row["words"]]
                clip = effects.load_clip(path, plan.pitch_st)
                ins = effects.insert_event(A.load_audio(row["audio"]), words, clip, plan)
                noise = np.random.default_rng(rng.getrandbits(32))
                wav = effects.add_noise(ins.wav, noise, rng.uniform(*effects.NOISE_DBFS_RANGE))
                wav, _ = effects.limit(wav)
                key = f"extra-{digest}-{k:02d}"
                sf.write(out / f"{key}.flac", wav, effects.SAMPLE_RATE)
                rows.append({"key": key, "audio": str(out / f"{key}.flac"), FIELD: label,
                             "extra": {FIELD: {"clip": path, "span": list(ins.span), GROUP: f"extra/{digest}"}}})
    return rows


def write_list(clips: dict[str, list[str]], data: Path, per: int, out: Path, seed: int) -> None:
    """The inserted utterances under `out`'s stem folder and their list at `out` (audio paths relative to it),
    the list written last and whole, so a list on disk always has its audio."""
    speech = [row for row in read_rows(data, "train_synth_srwt.jsonl") if row.get("words")]
    if not speech:
        raise SystemExit(f"{data}/train_synth_srwt.jsonl: no utterance with word times to insert the clips into")
    folder = out.parent / out.stem
    folder.mkdir(parents=True, exist_ok=True)
    rows = insert_clips(clips, speech, per, folder, seed)
    for row in rows:
        row["audio"] = str(Path(row["audio"]).relative_to(out.parent))
    write_jsonl(out, rows)
    print(f"{out}: {len(rows)} utterances of " + ", ".join(f"{len(files)} {label} clips" for label, files in
                                                          sorted(clips.items())) + f", {per} each")


def score(x: torch.Tensor, y: torch.Tensor, groups: list[str], scored: int, x_test: torch.Tensor,
          y_test: torch.Tensor, reg: float) -> tuple[float, float, Counter]:
    """A head fitted on (x, y): (accuracy held out by group on the first `scored` rows, test accuracy, test
    errors as (label, heard) counts). Rows past `scored` (the new clips) are fitted on, never scored."""
    vocab = tasks.LABELS[FIELD]
    held_out = cross_validate(x, y, groups, len(vocab), reg, scored=torch.arange(len(y)) < scored)
    weight, bias = fit_linear(x, y, len(vocab), reg)
    heard = (x_test @ weight.T + bias).argmax(-1)
    errors = Counter((vocab[a], vocab[b]) for a, b in zip(y_test.tolist(), heard.tolist()) if a != b)
    return held_out, float((heard == y_test).float().mean()), errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="osum-tiny", help="a model with a located event head (osum export "
                                                          "--locate-tag-head event)")
    ap.add_argument("--data", default="data/osum-tiny", help="an `osum synth` output folder")
    ap.add_argument("--clips", action="append", default=[], metavar="LABEL=GLOB",
                    help="clips of one event label (repeatable); default: the Debian sound effects above")
    ap.add_argument("--per", type=int, default=14, help="utterances made of each clip (the training split has 14.5 "
                                                        "a recording)")
    ap.add_argument("--reg", type=float, default=1e-2, help="the head's L2 penalty (as the export's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", metavar="LIST.jsonl", help="write the utterances and their list instead of scoring")
    args = ap.parse_args()
    if args.per < 1:
        raise SystemExit(f"--per {args.per}: at least one utterance a clip")
    clips = parse_clips(args.clips)
    data = Path(args.data)
    if args.write:
        write_list(clips, data, args.per, Path(args.write), args.seed)
        return
    model = osum.load(args.model).eval()
    if model.config.adaptor.located_head != FIELD or model.summary.locator is None:
        raise SystemExit(f"{args.model}: no frame locator for {FIELD} (osum export --locate-tag-head {FIELD})")
    train, test = read_rows(data, "train_synth_ved.jsonl"), read_rows(data, "test_synth_ved.jsonl")
    speech = [row for row in read_rows(data, "train_synth_srwt.jsonl") if row.get("words")]
    if not speech:
        raise SystemExit(f"{data}/train_synth_srwt.jsonl: no utterance with word times to insert the clips into")
    vocab = tasks.LABELS[FIELD]
    with tempfile.TemporaryDirectory() as tmp:
        extra = insert_clips(clips, speech, args.per, Path(tmp), args.seed)
        stats = {name: pooled_stats(model, rows, located=True) for name, rows in
                 (("train", train), ("extra", extra), ("test", test))}
    too_long = {name: sum(s is None for s in part) for name, part in stats.items()}
    if any(too_long.values()):
        raise SystemExit(f"utterances longer than one encoder pass: {too_long}")
    x_train, x_extra, x_test = (torch.stack(stats[name]) for name in ("train", "extra", "test"))
    y_train, y_extra, y_test = (torch.tensor([vocab.index(r[FIELD]) for r in rows]) for rows in (train, extra, test))
    g_train = [r["extra"][FIELD][GROUP] for r in train]
    g_extra = [r["extra"][FIELD][GROUP] for r in extra]
    print(f"{len(train)} training utterances of {len(set(g_train))} recordings; test: {len(test)}; new: "
          + ", ".join(f"{len(files)} {label} clips" for label, files in sorted(clips.items()))
          + f", {args.per} utterances each; L2 {args.reg}\n", flush=True)
    print("| added | recordings | utterances | recording-held-out (hedgewars rows) | test packs | test errors |")
    print("|---|---|---|---|---|---|", flush=True)
    for name, labels in [("nothing", ()), *((label, (label,)) for label in sorted(clips)), ("all", tuple(clips))]:
        if name == "all" and len(clips) == 1:
            continue
        keep = torch.tensor([r[FIELD] in labels for r in extra], dtype=torch.bool)
        x, y = torch.cat([x_train, x_extra[keep]]), torch.cat([y_train, y_extra[keep]])
        groups = g_train + [g for g, k in zip(g_extra, keep.tolist()) if k]
        held, accuracy, errors = score(x, y, groups, len(train), x_test, y_test, args.reg)
        wrong = ", ".join(f"{a} as {b} {n}" for (a, b), n in errors.most_common())
        print(f"| {name} | {len(set(groups)) - len(set(g_train))} | {int(keep.sum())} | {held:.1%} | "
              f"{accuracy:.1%} | {wrong} |", flush=True)


if __name__ == "__main__":
    main()
