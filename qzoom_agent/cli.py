"""The `qzoom-agent` command line.

Bad input (missing or corrupt files, bad options, unknown models) exits with code 2 and one line on stderr.
Set ``QZOOM_DEBUG=1`` to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .images import ImageLoadError

if TYPE_CHECKING:  # the demo pulls in torch and matplotlib: import it only where it runs
    from .demo import DemoRow

DEFAULT_BASE_CONFIG = "configs/train/zoomworld_tiny.yaml"


class UsageError(ValueError):
    """A user-facing problem with the command's input."""


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for integers >= ``minimum``."""
    kind = "a positive" if minimum == 1 else f"an integer >= {minimum}, not a"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {kind} integer, got {value}")
        return value

    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UsageError(message)


def _cmd_ask(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from .images import load_image
    from .model import QZoomModel

    image = load_image(args.image)  # fail on a bad image before spending time on the model
    hf_logging.disable_progress_bar()
    qzoom = False if args.no_qzoom else args.qzoom
    overrides = {}
    if args.max_tokens is not None:
        overrides["max_tokens"] = args.max_tokens
        if args.min_tokens is None:
            # Leave room below the cap: min == max would force an exact token count and distort the aspect ratio.
            overrides["min_tokens"] = min(256, max(1, args.max_tokens // 4))
    if args.min_tokens is not None:
        overrides["min_tokens"] = args.min_tokens
    model = QZoomModel.from_pretrained(args.model, qzoom, **overrides)
    mode = args.mode or ("auto" if model.heads is not None else "never")  # a plain model answers without zoom
    if mode != "never" and model.heads is None:
        raise UsageError(
            f"--mode {mode} needs Q-Zoom heads and {args.model} has none; pass --qzoom DIR or --mode never"
        )
    ans = model.answer(image, args.question, mode=mode, max_new_tokens=args.max_new_tokens, roi_query=args.roi_query)
    if args.json:
        print(json.dumps(ans.to_json()))
        return 0
    print(ans.text)
    details = [
        f"zoomed={ans.zoomed}",
        f"gate={ans.gate_score:.3f}" if ans.gate_score is not None else "gate=off",
        f"bbox={ans.bbox.to_json() if ans.bbox else None}",
        f"visual_tokens={ans.visual_tokens}",
        f"forward_passes={ans.forward_passes}",
        f"latency={ans.latency_s:.3f}s",
    ]
    print("  ".join(details), file=sys.stderr)
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import make_tiny

    out = make_tiny(args.out_dir, args.family, hidden=args.hidden, layers=args.layers, seed=args.seed,
                    with_heads=not args.no_heads)
    print(out)
    return 0


def _cmd_zoomworld(args: argparse.Namespace) -> int:
    from .bench.zoomworld import export_folder

    out = export_folder(args.variant, args.split, args.n, args.out, start=args.start, alphabet=args.alphabet)
    print(out)
    return 0


def demo_line(row: DemoRow, with_heads: bool) -> str:
    """The answers line the demo prints for one question; a box the gate did not act on is marked as such."""
    line = f"    truth {row.truth!r} | low-res {row.lowres_answer!r} | oracle view {row.oracle_answer!r}"
    if with_heads:
        gate = "off" if row.gate_score is None else f"{row.gate_score:.2f}"
        unused = "" if row.zoomed or row.box is None else " (not used: the gate skipped the zoom)"
        line += f" | gate {gate} | box {row.box}{unused} | Q-Zoom {row.qzoom_answer!r} (zoomed={row.zoomed})"
    return line


def _cmd_demo(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from .demo import draw_panels, load_demo_model, run_demo

    hf_logging.disable_progress_bar()
    model, trained, alphabet = load_demo_model(args.model)
    if not trained:
        print("note: zoomworld-tiny is not bundled in this installation; this runs a tiny RANDOM model, so the "
              "answers are noise (the gating, boxes and heat maps are computed for real)")
    elif model.heads is None:
        print(f"note: {args.model} has no Q-Zoom heads yet: shown are the low-resolution answer and the answer "
              "from the oracle view (the true target cropped and enlarged 3x, what a perfect zoom would show)")
    rows, panels = run_demo(model, args.n, variant=args.variant, alphabet=alphabet)
    for row in rows:
        print(f"[{row.kind}] {row.question.splitlines()[0]}")
        print(demo_line(row, with_heads=model.heads is not None))
    print(f"wrote {draw_panels(panels, args.out)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.common import CheckpointMismatchError, read_config
    from .train.joint import load_answer_config, run_joint
    from .train.warmup import load_train_config, run_warmup

    if args.stage == "stage1":
        from .train.stage1 import load_stage1_config, run_stage1

        if args.config == DEFAULT_BASE_CONFIG:
            raise UsageError("train stage1 needs --config (e.g. configs/train/stage1_zoomworld_tiny.yaml)")
        m = run_stage1(load_stage1_config(args.config), args.out, max_steps=args.steps)
        print(f"stage 1 (SD-RPN twig) at step {m['step']}: RoI hit rate {m['roi_hit']:.3f} (box covers >= 70% of "
              f"the target, <= 16x its area), coverage {m['roi_coverage']:.3f}, IoU {m['roi_iou']:.3f}; "
              f"{m['usable']}/{m['labelled']} pseudo-labels usable; "
              f"adapter in {os.path.join(args.out, 'stage1', 'qzoom')}")
        for key, label in (("roi_hit_by_family", "family"), ("roi_hit_by_size", "target side in tokens")):
            print(f"  RoI hit by {label}: " + ", ".join(f"{k} {v['hit']:.2f} ({v['n']})" for k, v in m[key].items()))
        print(f"  top token on the target {m['roi_top1']:.2f}, by family: "
              + ", ".join(f"{k} {v['hit']:.2f}" for k, v in m["roi_top1_by_family"].items()))
        return 0
    if args.stage == "stage2":
        from .train.stage2 import load_stage2_config, run_stage2

        if args.config == DEFAULT_BASE_CONFIG:
            raise UsageError("train stage2 needs --config (e.g. configs/train/stage2_zoomworld_tiny.yaml)")
        m = run_stage2(load_stage2_config(args.config), args.out, max_steps=args.steps)
        print(f"stage 2 (post-SFT) at step {m['step']}: {m['hard']} hard cases of {m['mined']}; val accuracy "
              f"direct {m['acc_never']:.3f}, zoomed {m['acc_always']:.3f}, gated {m['acc_auto']:.3f}; "
              f"model in {os.path.join(args.out, 'stage2', 'model')}")
        return 0
    if args.stage == "stage3":
        from .train.stage3 import load_stage3_config, run_stage3

        if args.config == DEFAULT_BASE_CONFIG:
            raise UsageError("train stage3 needs --config (e.g. configs/train/stage3_zoomworld_tiny.yaml)")
        m = run_stage3(load_stage3_config(args.config), args.out, max_steps=args.steps)
        auc = "n/a" if m["gate_auc"] is None else f"{m['gate_auc']:.3f}"
        print(f"stage 3 (gate) at step {m['step']}: AUC {auc} for 'zoom helps' ({m['zoom_helps']} of "
              f"{m['gate_scored']}), coarse skipped {m['coarse_skipped']:.3f}, fine zoomed {m['fine_zoomed']:.3f}; "
              f"{m['transition']} transitions, {m['kept']} kept; "
              f"adapter in {os.path.join(args.out, 'stage3', 'qzoom')}")
        return 0
    if args.stage != "base":
        raise UsageError(f"unknown training stage {args.stage!r}")
    if args.steps is not None and args.phase in ("all", "export"):
        raise UsageError("--steps needs a single --phase (1 to 4): each phase has its own schedule")
    if args.from_phase is not None and args.phase != "export":
        raise UsageError("--from-phase goes with --phase export")
    if args.phase == "export":
        from .loading import BUNDLED_MODELS
        from .train.export import export_model, latest_model

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
            from .train.grounding import load_grounding_config, run_grounding

            sizes, cfg, alphabet = load_grounding_config(args.config)
            m = run_grounding(cfg, args.out, alphabet=alphabet, sizes=sizes, max_steps=args.steps)
            print(f"phase 4 (grounding) at step {m.get('step')}: held-out zoom box hit {m['ground_hit']:.3f} "
                  f"(calls {m['ground_call_rate']:.3f}), fine answers {m['ground_fine_acc']:.3f}; plain path: "
                  f"oracle-crop reading {m['oracle_read_acc']:.3f}, coarse {m['coarse_acc']:.3f}")
    except CheckpointMismatchError as err:
        raise UsageError(str(err)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qzoom-agent", description="Q-Zoom adaptive perception for vision-language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ask = sub.add_parser("ask", help="answer one question about one image, zooming when the gate says so")
    ask.add_argument("image", help="image file (JPEG, PNG, WebP, TIFF, GIF, ...)")
    ask.add_argument("question", help="the question")
    ask.add_argument("--model", default="zoomworld-tiny", help="model directory or bundled model name")
    ask.add_argument("--qzoom", default=None, help="Q-Zoom adapter or official checkpoint (default: MODEL/qzoom)")
    ask.add_argument("--no-qzoom", action="store_true", help="load no Q-Zoom heads (implies --mode never)")
    ask.add_argument("--mode", choices=["auto", "never", "always"], default=None,
                     help="when to zoom (default: auto with Q-Zoom heads, never without)")
    ask.add_argument("--max-tokens", type=_positive, default=None, help="max visual tokens per image view")
    ask.add_argument("--min-tokens", type=_positive, default=None, help="min visual tokens per image view")
    ask.add_argument("--max-new-tokens", type=_positive, default=32, help="max generated tokens")
    ask.add_argument("--roi-query", default=None, help="the text the zoom box is found for (default: the question, "
                     "or its text before any answer options when the adapter says roi_query: stem)")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.set_defaults(func=_cmd_ask)

    tiny = sub.add_parser("make-tiny", help="write a tiny random model of a family, loadable offline")
    tiny.add_argument("out_dir", help="output directory")
    tiny.add_argument("--family", choices=["qwen2_5_vl", "qwen3_vl", "llava"], default="qwen2_5_vl")
    tiny.add_argument("--hidden", type=_positive, default=64, help="hidden size (multiple of 16)")
    tiny.add_argument("--layers", type=_positive, default=None, help="language-model layers")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--no-heads", action="store_true", help="do not write Q-Zoom heads (copied from the base)")
    tiny.set_defaults(func=_cmd_make_tiny)

    zw = sub.add_parser("zoomworld", help="write ZoomWorld images, questions and boxes to a folder (resumable)")
    zw.add_argument("--variant", choices=["hr", "doc"], required=True, help="photo-like clutter or page layouts")
    zw.add_argument("--split", choices=["train", "val", "test"], required=True, help="seed range to draw from")
    zw.add_argument("--n", type=_positive, required=True, help="number of samples")
    zw.add_argument("--out", required=True, help="output folder; an interrupted run there is resumed")
    zw.add_argument("--start", type=_non_negative, default=0, help="first sample index")
    zw.add_argument("--alphabet", default="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", help="glyph characters (A-Z0-9)")
    zw.set_defaults(func=_cmd_zoomworld)

    demo = sub.add_parser("demo", help="answer a few ZoomWorld test questions and draw boxes and heat maps")
    demo.add_argument("--model", default="zoomworld-tiny", help="model directory or bundled model name")
    demo.add_argument("--n", type=_positive, default=4, help="number of questions")
    demo.add_argument("--variant", choices=["hr", "doc"], default="hr")
    demo.add_argument("--out", default="qzoom-demo.png", help="PNG with boxes and RoI heat maps")
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="train zoomworld-tiny (stage 'base'); resumable from OUT")
    train.add_argument("stage", choices=["base", "stage1", "stage2", "stage3"], help="what to train")
    train.add_argument("--config", default=DEFAULT_BASE_CONFIG, help="training YAML")
    train.add_argument("--out", required=True, help="run folder; an interrupted run there resumes")
    train.add_argument("--phase", choices=["1", "2", "3", "4", "all", "export"], default="all",
                       help="which phase(s) of the recipe ('all' runs phase 4 when the YAML has a 'grounding:' "
                            "section); 'export' ships the latest phase's model as fp16")
    train.add_argument("--to", default=None, help="export destination (default: the bundled zoomworld-tiny)")
    train.add_argument("--from-phase", type=int, choices=[1, 2, 3, 4], default=None,
                       help="export this phase's model (default: the latest of phases 1-3; 4 is the grounded policy)")
    train.add_argument("--steps", type=_positive, default=None, help="stop this phase at this step (resume later)")
    train.set_defaults(func=_cmd_train)

    from .bench.runner import add_compare_parser

    add_compare_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qzoom-agent` console script; returns the exit code."""
    expected: tuple[type[Exception], ...] = (UsageError, ImageLoadError, FileNotFoundError, ValueError)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "ask" and args.no_qzoom:
            args.mode = "never"
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except expected as err:
        if os.environ.get("QZOOM_DEBUG"):
            raise
        print(f"qzoom-agent: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qzoom-agent: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure still gets one line; QZOOM_DEBUG=1 shows the traceback
        if os.environ.get("QZOOM_DEBUG"):
            raise
        print(f"qzoom-agent: internal error: {type(err).__name__}: {_one_line(err)} (QZOOM_DEBUG=1 for details)",
              file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
