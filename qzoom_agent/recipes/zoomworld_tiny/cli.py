"""``qzoom-agent train base``: the phases of the zoomworld-tiny recipe from the command line.

The main CLI hands ``train base`` here, so the product's commands never import the recipe until it is asked for.
The tool-calling policy (`tool_policy`) also runs on its own::

    python -m qzoom_agent.recipes.zoomworld_tiny.cli tool-policy --out runs/tp [--steps N] [--to DIR]
    python -m qzoom_agent.recipes.zoomworld_tiny.cli tool-policy-eval --policy runs/tp/tool_policy/policy --n 200

A crop-call policy (``data.call: crop``, ``configs/recipes/zoomworld_tiny/crop_policy.yaml``) trains the same way and
is evaluated by the DeepEyes agent (``--policy zoomworld-tiny-deepeyes``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ...checks import UsageError
from ...loading import BUNDLED_MODELS
from ...train.common import read_config
from .answer_config import load_answer_config
from .export import export_model, latest_model
from .grounding import load_grounding_config, run_grounding
from .joint import run_joint
from .run_state import CheckpointMismatchError
from .tool_policy import EXAMPLE as TOOL_POLICY_CONFIG
from .warmup import load_train_config, run_warmup


def cmd_train_base(args: argparse.Namespace) -> int:
    """Run ``--phase`` (1-4, all, export or tool-policy) of the recipe in ``--config`` into ``--out``; prints what
    each phase reached and returns 0.

    Raises:
        UsageError: options that do not go together, or a run folder written under another config.
    """
    if args.phase == "tool-policy":
        return cmd_tool_policy(args)
    if args.steps is not None and args.phase in ("all", "export"):
        raise UsageError("--steps needs a single --phase (1 to 4): each phase has its own schedule")
    if args.from_phase is not None and args.phase != "export":
        raise UsageError("--from-phase goes with --phase export")
    if args.phase == "export":
        src = latest_model(args.out, args.from_phase)
        _, _, alphabet = load_answer_config(args.config)
        dst = export_model(src, args.to or BUNDLED_MODELS["zoomworld-tiny"], alphabet=alphabet)
        size = sum(f.stat().st_size for f in dst.iterdir()) / 2**20
        print(f"exported {src} to {dst} ({size:.1f} MiB, alphabet {alphabet})")
        return 0
    try:
        if args.phase in ("1", "all"):
            sizes, cfg = load_train_config(args.config)
            m = run_warmup(cfg, args.out, sizes=sizes, max_steps=args.steps)
            aligned, free = m.get("char_acc_aligned", float("nan")), m.get("char_acc_free", float("nan"))
            print(f"phase 1 (vision warm-up) at step {m.get('step')}: held-out char accuracy aligned {aligned:.3f}, "
                  f"free-placed {free:.3f}")
        for phase, what in ((2, "answer training"), (3, "native-scale tiles")):
            if args.phase not in (str(phase), "all"):
                continue
            sizes, cfg, alphabet = load_answer_config(args.config, phase)
            m = run_joint(cfg, args.out, alphabet=alphabet, sizes=sizes, max_steps=args.steps, phase=phase)
            print(f"phase {phase} ({what}) at step {m.get('step')}: held-out oracle-crop reading "
                  f"{m.get('oracle_read_acc', float('nan')):.3f}, native-tile reading "
                  f"{m.get('tile_read_acc', float('nan')):.3f}, coarse {m.get('coarse_acc', float('nan')):.3f}")
        if args.phase == "4" or (args.phase == "all" and "grounding" in read_config(args.config)):
            sizes, cfg, alphabet = load_grounding_config(args.config)
            m = run_grounding(cfg, args.out, alphabet=alphabet, sizes=sizes, max_steps=args.steps)
            print(f"phase 4 (grounding) at step {m.get('step')}: held-out zoom box hit {m['ground_hit']:.3f} "
                  f"(calls {m['ground_call_rate']:.3f}), fine answers {m['ground_fine_acc']:.3f}; plain path: "
                  f"oracle-crop reading {m['oracle_read_acc']:.3f}, coarse {m['coarse_acc']:.3f}")
    except CheckpointMismatchError as err:
        raise UsageError(str(err)) from None
    return 0




def cmd_tool_policy(args: argparse.Namespace) -> int:
    """Train (or resume) the tool-calling policy of ``--config`` (the recipe's ``base.yaml`` means
    ``tool_policy.yaml``) into ``--out``, export it (also to ``--to``), print its held-out figures; returns 0.

    Raises:
        UsageError: a bad config, or a run folder written under another config.
    """
    from .tool_policy import load_tool_policy_config, run_tool_policy

    path = args.config if Path(args.config).name != "base.yaml" else TOOL_POLICY_CONFIG
    try:
        cfg = load_tool_policy_config(path)
        m = run_tool_policy(cfg, args.out, max_steps=args.steps, to=args.to)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"tool policy at step {m['step']} -> {m['policy']}" + (f" and {args.to}" if args.to else ""))
    print(f"held-out VAL tool loop ({m['n_fine']} fine, {m['n_coarse']} coarse): calls fine {_pct(m['call_fine'])}, "
          f"coarse {_pct(m['call_coarse'])}; accuracy fine {_pct(m['acc_fine'])}, coarse {_pct(m['acc_coarse'])}")
    return 0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


EVAL_COLUMNS = ("n_fine", "n_coarse", "call_fine", "call_coarse", "acc_fine", "acc_coarse", "box_holds",
                "acc_fine_held", "acc_fine_missed")
CROP_EVAL_COLUMNS = ("n_fine", "n_coarse", "call_fine", "call_coarse", "n_calls", "croppable", "roi_hit",
                     "box_holds", "again", "acc_fine", "acc_coarse", "acc_fine_held", "acc_fine_missed")


def cmd_tool_policy_eval(args: argparse.Namespace) -> int:
    """The policy in its real loop (the zoom tool loop for a zoom-call policy, the DeepEyes agent for a crop-call
    one) and, unless ``--policy-only``, its base without zoom (``never``) and gated (``auto``) on the same TEST
    questions per variant; prints a markdown table (and writes the rows to ``--json``); returns 0."""
    import time

    import torch

    from ...model import QZoomModel
    from ...policy import read_policy, resolve_policy_path
    from .tool_policy import evaluate_base, evaluate_crop_policy, evaluate_policy, test_samples

    torch.set_num_threads(args.threads)
    policy_path = resolve_policy_path(args.policy)
    policy_cfg = read_policy(policy_path)[0]
    base_name = args.base or policy_cfg.base
    policy = QZoomModel.from_pretrained(str(policy_path))
    base = None if args.policy_only else QZoomModel.from_pretrained(base_name)
    alphabet = args.alphabet or trained_alphabet_of(base_name)
    crop = policy_cfg.call == "crop"
    loop = ("deepeyes-cached" if args.cached else "deepeyes") if crop else "tool loop"
    systems = [f"policy ({loop})"] + ([] if args.policy_only else ["base, mode=never", "base, mode=auto"])
    rows = []
    for variant in args.variants.split(","):
        samples = test_samples(variant, args.n, args.seed, alphabet)
        for system in systems:
            t0 = time.perf_counter()
            if system.startswith("policy"):
                figures = evaluate_crop_policy(policy, samples, cached=args.cached) if crop else evaluate_policy(
                    policy, samples)
            else:
                figures = evaluate_base(base, samples, system.rpartition("=")[2])
            rows.append({"variant": variant, "system": system, "n": args.n, "seed": args.seed, **figures,
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    columns = CROP_EVAL_COLUMNS if crop else EVAL_COLUMNS
    print("| variant | system | " + " | ".join(columns) + " |")
    print("|---|---|" + "---:|" * len(columns))
    for r in rows:
        cells = [str(r.get(c, "-")) if c.startswith("n_") else _pct(r.get(c)) for c in columns]
        print(f"| {r['variant']} | {r['system']} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def trained_alphabet_of(name: str) -> str:
    """The ZoomWorld alphabet of a base model (its ``zoomworld.json``), else ZoomWorld's default."""
    from ...loading import resolve_model_path, trained_alphabet
    from ...zoomworld import DEFAULT_ALPHABET

    return trained_alphabet(resolve_model_path(name)) or DEFAULT_ALPHABET


def main(argv: list[str] | None = None) -> int:
    """``tool-policy`` (train) and ``tool-policy-eval`` without the main CLI."""
    p = argparse.ArgumentParser(prog="python -m qzoom_agent.recipes.zoomworld_tiny.cli")
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("tool-policy", help="train, export and check the tool-calling policy")
    train.add_argument("--config", default=TOOL_POLICY_CONFIG, help="recipe YAML with a tool_policy: section")
    train.add_argument("--out", required=True, help="run folder; an interrupted run there resumes")
    train.add_argument("--steps", type=int, default=None, help="stop at this step (resume later)")
    train.add_argument("--to", default=None, help="also write the policy here (e.g. the bundled "
                       "qzoom_agent/assets/zoomworld-tiny/policy)")
    ev = sub.add_parser("tool-policy-eval", help="the policy's tool loop against its base on TEST questions")
    ev.add_argument("--policy", default="zoomworld-tiny-tool", help="policy folder or bundled policy name")
    ev.add_argument("--base", default=None, help="the base for the never/auto rows (default: the policy's)")
    ev.add_argument("--variants", default="hr,doc", help="comma-separated ZoomWorld variants")
    ev.add_argument("--n", type=int, default=200, help="TEST questions per variant (all kinds)")
    ev.add_argument("--seed", type=int, default=0, help="picks the questions, as compare --seed does")
    ev.add_argument("--alphabet", default=None, help="tag characters (default: the base's)")
    ev.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ev.add_argument("--policy-only", action="store_true", help="skip the base's never/auto rows")
    ev.add_argument("--cached", action="store_true", help="crop-call policies: run deepeyes-cached (the KV cache "
                    "continued across turns) instead of deepeyes (same prompts, re-run every turn)")
    ev.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    try:
        return cmd_tool_policy(args) if args.command == "tool-policy" else cmd_tool_policy_eval(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
