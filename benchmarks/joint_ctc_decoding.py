"""What joint CTC/LLM decoding of transcripts costs: greedy asr with the LLM alone vs with generation.ctc_weight,
same model, clips and batches, one run.

    python benchmarks/joint_ctc_decoding.py --model osum-tiny --clips "data/osum-tiny/audio/test/*asr*.flac" --limit 64

Prints audio seconds per second of each mode (its fastest of --repeats runs), their ratio, and how many transcripts differ between the modes
(`osum eval --ctc-weight` tells whether they got better).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import time

import torch

import osum
from osum.infer.engine import Engine


def timed_run(engine: Engine, clips: list[str]) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    results = engine.run(clips, task="asr")
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="osum-tiny", help="model directory, released model or preset")
    parser.add_argument("--clips", default="examples/*.wav", help="glob of audio files")
    parser.add_argument("--limit", type=int, default=None, help="the first N clips only")
    parser.add_argument("--ctc-weight", type=float, default=None, help="default: the model's generation.ctc_weight")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating; the fastest counts")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    clips = sorted(glob.glob(args.clips))[: args.limit]
    if not clips:
        raise SystemExit(f"no audio matches {args.clips!r}")
    model = osum.load(args.model)
    if args.ctc_weight is None:
        args.ctc_weight = model.config.generation.ctc_weight
    base = dataclasses.replace(model.config.generation, num_beams=1, do_sample=False, ctc_weight=0.0)
    llm = Engine(model, max_batch_size=args.batch_size, generation=base)
    joint = Engine(model, max_batch_size=args.batch_size,
                   generation=dataclasses.replace(base, ctc_weight=args.ctc_weight))
    llm.run(clips[:1], task="asr")  # warm-up: first-call allocations and lazy inits

    # The modes alternate and each keeps its fastest run: a machine shared with other work is noisy.
    t_llm = t_joint = float("inf")
    for _ in range(args.repeats):
        t, r_llm = timed_run(llm, clips)
        t_llm = min(t_llm, t)
        t, r_joint = timed_run(joint, clips)
        t_joint = min(t_joint, t)
    audio = sum(r["duration"] for r in r_llm)
    differ = sum(a["raw"] != b["raw"] for a, b in zip(r_llm, r_joint))
    print(f"model {args.model}, {len(clips)} files, {audio:.1f} s of audio, batch size {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"LLM alone          : {t_llm:7.2f} s  {audio / t_llm:7.2f} audio s/s")
    print(f"joint, ctc_weight {args.ctc_weight}: {t_joint:7.2f} s  {audio / t_joint:7.2f} audio s/s")
    longest = [max(len(r["raw"]) for r in rs) for rs in (r_llm, r_joint)]
    print(f"cost: {t_joint / t_llm:.2f}x the time   transcripts differing: {differ}/{len(clips)}   "
          f"decoded again by the loop guard: {llm.stats.redecoded} / {joint.stats.redecoded}   "
          f"longest output: {longest[0]} / {longest[1]} characters")


if __name__ == "__main__":
    main()
