"""The `qzoom-agent compare` command line: options, their checks, and the printed summary (the run is `runner`'s)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import zoomworld
from ..checks import int_at_least
from ..presets import get_preset, preset_names
from . import registry, report, rundir, sources
from .runner import CompareConfig, run_compare, split_size


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """Validate the parsed `compare` options.

    Raises:
        ValueError: unknown bench or agent, n < 1 or beyond the test split, a bad budget list, bad token counts, or
            an unknown preset. A real benchmark is not read here (:func:`resolve` reads it).
    """
    bench = sources.check_bench(args.bench)
    names = [a.strip() for a in str(args.agents).split(",") if a.strip()]
    if args.budgets is not None:
        names += [f"plain@{b}" for b in registry.parse_budgets(args.budgets)]
    if not names:
        raise ValueError("no agents given; pass --agents lowres,highres or --budgets 256,1024")
    for name in names:
        registry.check_agent_name(name)
    repeated = sorted({a for a in names if names.count(a) > 1})
    if repeated:
        raise ValueError(f"agents repeat: {', '.join(repeated)}; list each agent once")
    if args.n is not None:
        int_at_least(args.n, 1, "--n")
        if sources.is_zoomworld(bench) and args.n > split_size():
            raise ValueError(f"--n {args.n} exceeds the {split_size()} questions of the test split")
    for opt in ("lowres_tokens", "highres_tokens", "max_new_tokens", "qzoom_tokens"):
        if getattr(args, opt) is not None:
            int_at_least(getattr(args, opt), 1, "--" + opt.replace("_", "-"))
    alphabet = args.alphabet or ""
    if alphabet:
        zoomworld.check_alphabet(alphabet)
    preset = getattr(args, "preset", None) or "auto"
    if preset not in ("auto", "none"):
        get_preset(preset, "qwen2_5_vl")  # raises naming the known presets
    return CompareConfig(bench, names, args.n, args.seed, str(args.out), str(args.model), args.lowres_tokens,
                         args.highres_tokens, args.max_new_tokens, args.device, alphabet, args.qzoom_tokens,
                         args.policy or "", args.crop_policy or "", preset)


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("compare", help="compare agents' accuracy and cost on benchmark questions",
                              description="Run agents on benchmark questions, interleaved, and summarise accuracy "
                              "against cost. Rerun with the same --out and arguments to resume.")
    p.add_argument("--bench", required=True,
                   help="zoomworld:hr, zoomworld:doc, or TASK:PATH for a real benchmark (e.g. vstar:DIR, docvqa:DIR)")
    p.add_argument("--agents", default="lowres,highres",
                   help=f"comma-separated agents: {', '.join(registry.known_agents())} (default: lowres,highres)")
    p.add_argument("--n", type=int, default=None,
                   help="number of questions (default: 100 on ZoomWorld, all of a real benchmark)")
    p.add_argument("--seed", type=int, default=0, help="picks the test questions (default 0)")
    p.add_argument("--out", required=True, help="output directory; rerun with the same arguments to resume")
    p.add_argument("--budgets", default=None, help="also run plain@B for each budget, e.g. 256,576,1024,2048,4096")
    p.add_argument("--model", default="zoomworld-tiny",
                   help="model directory, bundled model name or a policy (directory with policy.json)")
    p.add_argument("--lowres-tokens", type=int, default=registry.DEFAULT_LOWRES_TOKENS,
                   help="visual tokens of the lowres agent (default 256)")
    p.add_argument("--highres-tokens", type=int, default=registry.DEFAULT_HIGHRES_TOKENS,
                   help="visual tokens of the highres agent (default 4096)")
    p.add_argument("--qzoom-tokens", type=int, default=registry.DEFAULT_QZOOM_TOKENS,
                   help="global-view visual tokens of the qzoom agents (default 576)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="max generated tokens per answer (default: the benchmark's own; 8 on ZoomWorld)")
    p.add_argument("--preset", default="auto",
                   help="RoI and gate thresholds: auto (the benchmark's task; default), none, or one of "
                        f"{', '.join(preset_names())}")
    p.add_argument("--alphabet", default=None,
                   help="tag characters of the questions (default: the model's training alphabet, else A-Z0-9)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--policy", default=None, help="tool-calling policy of qzoom-tool (default: zoomworld-tiny-tool)")
    p.add_argument("--crop-policy", default=None,
                   help="external-crop policy of the deepeyes agents (default: zoomworld-tiny-deepeyes on the bundled "
                        "model, else --model itself)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    """Run `qzoom-agent compare`; prints the summary table (or one JSON object with ``--json``); returns 0."""
    cfg = config_from_args(args)
    summary = run_compare(cfg)
    if not rundir.current_shard().main:
        return 0  # the main process prints the merged summary
    if args.json:
        print(json.dumps(summary))  # noqa: T201 - CLI output
    else:
        print(report.markdown_table(summary))  # noqa: T201 - CLI output
        extra = report.findings(summary)
        if extra:
            print("\n" + "\n".join(extra))  # noqa: T201 - CLI output
    return 0
