"""The `osum synth` subcommand: its arguments and what it prints."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from osum.data.synth.real import VALID_SHARE

    p = sub.add_parser("synth", help="build the synthetic multi-task English corpus from offline TTS voices")
    p.add_argument("--out", help="output folder (shards, eval lists, provenance)")
    p.add_argument("--sentences", type=int, default=12000, help="synthetic training utterances (default: 12000)")
    p.add_argument("--test-per-task", type=int, default=100,
                   help="utterances per test_synth_<family>.jsonl (default: 100)")
    p.add_argument("--valid", type=int, default=200, help="synthetic validation utterances (default: 200)")
    p.add_argument("--voices", nargs="+", default=None,
                   help="voice ids or engine names (default: every voice that works here; see --list-voices)")
    p.add_argument("--seed", type=int, default=0, help="plan seed: same seed, same corpus (default: 0)")
    p.add_argument("--jobs", type=int, default=1, help="parallel synthesis processes (default: 1)")
    p.add_argument("--no-real", action="store_true", help="leave out the real Debian recordings")
    p.add_argument("--real-valid-share", type=float, default=VALID_SHARE,
                   help=f"share of the real recordings held out as valid_real.jsonl, never trained on (default: "
                        f"{VALID_SHARE}; 0 gives corpora built before it, whose train_real held them)")
    p.add_argument("--open-sentences", type=int, default=0,
                   help="training utterances of open-domain text (WordNet's usage examples, Debian wordnet-base; "
                        "family open, task asr), planned apart so the rest of the corpus is unchanged; valid and "
                        "test_synth_open.jsonl get their shares (default: 0)")
    p.add_argument("--list-voices", action="store_true", help="list the voices and whether each works here")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from osum.data.synth import voices

    if args.list_voices:
        for v in voices.VOICES.values():
            why = voices.missing(v)
            print(f"{v.id:18s} {v.engine:9s} {v.gender:7s} {v.split:6s} {'ok' if why is None else why}")
        return 0
    if not args.out:
        raise ValueError("--out is required (or --list-voices)")
    from osum.data.synth.build import SynthConfig, build

    cfg = SynthConfig(out=args.out, sentences=args.sentences, test_per_task=args.test_per_task, valid=args.valid,
                      voices=args.voices, seed=args.seed, jobs=args.jobs, real=not args.no_real,
                      real_valid=args.real_valid_share, open_sentences=args.open_sentences)
    prov = build(cfg, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    b = prov["build"]
    print(f"osum synth: {b['utterances_planned']} utterances planned, {b['synthesised_now']} synthesised now "
          f"({b['utterances_per_minute']} per minute), {b['reused_from_earlier_run']} kept from an earlier run, "
          f"{b['failed']} failed; {b['total_seconds']} s", file=sys.stderr)
    for name, split in prov["splits"].items():
        print(f"  {name}: {split['utterances']} utterances, {split['hours']} h", file=sys.stderr)
    for name, n in prov["test_files"].items():
        print(f"  {name}: {n} rows", file=sys.stderr)
    if prov["voices_unusable"]:
        print(f"  voices not usable here: {prov['voices_unusable']}", file=sys.stderr)
    for f in prov["failures"][:5]:
        print(f"  failed {f['key']}: {f['reason']}", file=sys.stderr)
    print(f"  provenance: {args.out}/provenance.json", file=sys.stderr)
    return 1 if b["failed"] else 0
