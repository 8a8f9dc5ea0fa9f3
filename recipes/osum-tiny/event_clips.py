"""Which event clips an `osum eval` run of the event task got right, clip by clip.

The test list's vocal events are a few dozen held-out clips, each inserted into one or more utterances: the
accuracy over utterances weighs a clip by how often the corpus plan drew it. This reads each utterance's clip
from the metadata `osum synth` wrote beside its audio (`<key>.json`, `sample.extra.event`) and prints, per clip,
how often the run's event label was right and what it heard instead, then the accuracy with every clip weighted
alike:

    python recipes/osum-tiny/event_clips.py exp/osum-tiny/eval-release/synth-ved
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path


def per_clip(run: Path) -> dict[str, dict]:
    """clip -> {label, utterances, right, heard (Counter of the labels given)} over the run's scored rows."""
    clips: dict[str, dict] = defaultdict(lambda: {"label": None, "utterances": 0, "right": 0, "heard": Counter()})
    for line in (run / "hyp.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        ref = row.get("ref", {}).get("event")
        if ref is None or "hyp" not in row:
            continue
        meta = Path(row["audio"]).with_suffix(".json")
        if not meta.is_file():
            raise SystemExit(f"{meta}: no `osum synth` metadata beside the audio, so the event clip is unknown "
                             "(the run's audio paths are as the eval read them: run this where the eval ran)")
        event = json.loads(meta.read_text(encoding="utf-8"))["sample"]["extra"]["event"]
        heard = row["hyp"].get("labels", {}).get("event")
        c = clips[event["clip"]]
        c["label"] = ref
        c["utterances"] += 1
        c["right"] += heard == ref
        c["heard"][heard or "(none)"] += 1
    return dict(clips)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="an `osum eval` output folder of an event task (hyp.jsonl)")
    args = ap.parse_args()
    clips = per_clip(args.run)
    if not clips:
        raise SystemExit(f"{args.run}: no scored rows with a reference event")
    print("| label | clip | utterances | right | heard as |\n|---|---|---|---|---|")
    for name, c in sorted(clips.items(), key=lambda kv: (kv[1]["label"], kv[0])):
        heard = ", ".join(f"{label} {n}" for label, n in c["heard"].most_common())
        print(f"| {c['label']} | {name} | {c['utterances']} | {c['right']} | {heard} |")
    total = sum(c["utterances"] for c in clips.values())
    right = sum(c["right"] for c in clips.values())
    largest = max(clips, key=lambda k: clips[k]["utterances"])
    balanced = sum(c["right"] / c["utterances"] for c in clips.values()) / len(clips)
    print(f"\n{total} utterances of {len(clips)} clips: accuracy {right / total:.1%} over utterances, "
          f"{balanced:.1%} with every clip weighted alike; the most drawn clip, {largest}, holds "
          f"{clips[largest]['utterances']} utterances ({clips[largest]['right']} right)")


if __name__ == "__main__":
    main()
