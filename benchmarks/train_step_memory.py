"""Peak memory and time of a CPU training step, with and without gradient checkpointing of the LLM, side by side.

    python benchmarks/train_step_memory.py          # osum-tiny stage 2 (LoRA), the recipe's largest batch: 16 x 10 s

A LoRA step keeps every LLM layer's activations for the backward pass, though the LLM's own weights are frozen:
most of a CPU step's memory. `model.llm.gradient_checkpointing=true` keeps only each layer's input and computes
the rest again during the backward pass. Each setting runs in its own process, so its peak resident memory
(ru_maxrss) is its own; the first `--warmup` steps are not timed.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

# a sibling script (a script's own folder is on the import path)
from train_step_precision import add_step_arguments, median_step_time, model_and_batch

SETTINGS = {"off": [], "on": ["model.llm.gradient_checkpointing=true"]}


def rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(args: argparse.Namespace) -> None:
    """One setting: model memory, peak memory and median step time, as JSON."""
    model, batch = model_and_batch(args.config, args.batch_size, args.seconds, SETTINGS[args.worker] + args.overrides)
    loaded = rss_gb()
    seconds = median_step_time(model, batch, args.steps, args.warmup)
    print(json.dumps({"loaded_gb": loaded, "peak_gb": rss_gb(), "s_per_step": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, batch_size=16, steps=2, warmup=1)
    parser.set_defaults(config="recipes/osum-tiny/stage2.yaml", seconds=10.0)
    parser.add_argument("--override", dest="overrides", action="append", default=[],
                        help="a dotted model override for both settings, e.g. model.adaptor.summary_layers=[0,1,2,4]")
    parser.add_argument("--worker", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {}
    for name in SETTINGS:
        cmd = [sys.executable, __file__, "--worker", name, "--config", args.config, "--batch-size",
               str(args.batch_size), "--seconds", str(args.seconds), "--steps", str(args.steps), "--warmup",
               str(args.warmup), *[f"--override={o}" for o in args.overrides]]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    print(f"{args.config}: batch {args.batch_size} x {args.seconds} s, fp32; model loaded: "
          f"{results['off']['loaded_gb']:.2f} GB")
    for name, r in results.items():
        print(f"LLM gradient checkpointing {name}: peak {r['peak_gb']:.2f} GB, {r['s_per_step']:.2f} s/step")
    off, on = results["off"], results["on"]
    print(f"checkpointing: peak memory {on['peak_gb'] / off['peak_gb']:.2f}x, step time "
          f"{on['s_per_step'] / off['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
