"""Batched engine vs one-file-at-a-time generation (the reference code's way), same model and clips, one run.

    python benchmarks/infer_throughput.py --model preset:osum-tiny --copies 8 --batch-size 16

Prints audio seconds per second of each mode, their ratio, and how many outputs differ between the modes.
"""
from __future__ import annotations

import argparse
import glob
import time

import torch

import osum
from osum.config import GenerationConfig
from osum.infer.engine import Engine


def timed_run(engine: Engine, clips: list[str], task: str) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    results = engine.run(clips, task=task)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preset:osum-tiny", help="model directory, released model or preset")
    parser.add_argument("--clips", default="examples/*.wav", help="glob of audio files")
    parser.add_argument("--copies", type=int, default=8, help="each clip is listed this many times")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--task", default="asr")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    clips = sorted(glob.glob(args.clips)) * args.copies
    if not clips:
        raise SystemExit(f"no audio matches {args.clips!r}")
    model = osum.load(args.model)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    batched = Engine(model, max_batch_size=args.batch_size, generation=gen)
    single = Engine(model, max_batch_size=1, generation=gen)
    single.run(clips[:1], task=args.task)  # warm-up: first-call allocations and lazy inits

    t_single, r_single = timed_run(single, clips, args.task)
    t_batched, r_batched = timed_run(batched, clips, args.task)
    audio = sum(r["duration"] for r in r_single)
    differ = sum(a["raw"] != b["raw"] for a, b in zip(r_single, r_batched))
    print(f"model {args.model}, {len(clips)} files, {audio:.1f} s of audio, task {args.task}, "
          f"max_new_tokens {args.max_new_tokens}, torch threads {torch.get_num_threads()}")
    print(f"one at a time : {t_single:7.2f} s  {audio / t_single:7.2f} audio s/s")
    print(f"batched (≤{args.batch_size:>3}): {t_batched:7.2f} s  {audio / t_batched:7.2f} audio s/s  "
          f"batches {batched.stats.batches}")
    print(f"speed-up      : {t_single / t_batched:.2f}x   outputs differing between modes: {differ}/{len(clips)}")


if __name__ == "__main__":
    main()
