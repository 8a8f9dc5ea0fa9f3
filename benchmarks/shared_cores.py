"""Two jobs on one machine: each with every core (torch's default) vs each with its share (`osum --threads`).

    python benchmarks/shared_cores.py                 # osum-tiny stage 1 training steps, batch 8 x 3.5 s, fp32

Runs the same fixed training step (forward + backward, random log-mels) three ways, side by side in one run:
one job alone with torch's default threads; two such jobs at once, each with the default; two at once, each
with half the cores (`torch.set_num_threads`, what `osum --threads N` sets). Torch's default gives every process
one thread per core, so two processes run twice as many busy threads as there are cores. Each job's first
`--warmup` steps are not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
# a sibling script (a script's own folder is on the import path)
from train_step_precision import add_step_arguments, median_step_time, model_and_batch


def worker(args: argparse.Namespace) -> None:
    """One job: time `args.steps` training steps and print their median as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, batch = model_and_batch(args.config, args.batch_size, args.seconds)
    seconds = median_step_time(model, batch, args.steps, args.warmup)
    print(json.dumps({"threads": torch.get_num_threads(), "s_per_step": seconds}))


def run_jobs(args: argparse.Namespace, jobs: int, threads: int) -> list[dict]:
    """Start `jobs` workers at once and wait for all; their reports, in order."""
    cmd = [sys.executable, __file__, "--worker", "--config", args.config, "--batch-size", str(args.batch_size),
           "--seconds", str(args.seconds), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(threads)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    reports = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a worker failed (exit {proc.returncode})")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, batch_size=8, steps=3, warmup=1)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    cores = os.cpu_count() or 1
    if cores < 2:
        raise SystemExit("needs at least 2 cores to share")
    default = torch.get_num_threads()
    alone = run_jobs(args, 1, default)[0]["s_per_step"]
    crowded = statistics.mean(r["s_per_step"] for r in run_jobs(args, 2, default))
    shared = statistics.mean(r["s_per_step"] for r in run_jobs(args, 2, max(1, cores // 2)))
    print(f"{args.config}: batch {args.batch_size} x {args.seconds} s, fp32, {cores} cores")
    print(f"one job alone, {default} threads: {alone:.2f} s/step")
    print(f"two jobs at once, {default} threads each: {crowded:.2f} s/step ({crowded / alone:.1f}x alone)")
    print(f"two jobs at once, {max(1, cores // 2)} each: {shared:.2f} s/step ({shared / alone:.1f}x alone)")
    print(f"sharing the cores out is {crowded / shared:.2f}x faster for each job than both taking all")


if __name__ == "__main__":
    main()
