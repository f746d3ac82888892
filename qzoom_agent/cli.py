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

from .checks import UsageError, int_at_least, one_line
from .images import ImageLoadError

if TYPE_CHECKING:  # the demo pulls in torch and matplotlib: import it only where it runs
    from .demo import DemoRow

DEFAULT_BASE_CONFIG = "configs/recipes/zoomworld_tiny/base.yaml"


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for integers >= ``minimum`` (`checks.int_at_least`)."""

    def parse(text: str) -> int:
        try:
            return int_at_least(text, minimum, "the value")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

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
    model = QZoomModel.from_pretrained(args.model, qzoom, preset=args.preset, **overrides)
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
    from .zoomworld import export_folder

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
    _demo_agent(args, rows, alphabet)
    return 0


def _demo_agent(args: argparse.Namespace, rows: list, alphabet: str) -> None:
    """The same demo, one question through the agent loop in tool mode, with its trace."""
    from .agent.run import format_trace
    from .demo import agent_demo
    from .policy import is_policy

    policy = args.policy
    if args.model != "zoomworld-tiny" and policy == "zoomworld-tiny-tool":
        print(f"(agent loop skipped: the bundled policy was trained on zoomworld-tiny, not on {args.model}; pass "
              "--policy for one trained on it)")
        return
    if not rows or not is_policy(policy):
        print(f"(agent loop skipped: no tool-calling policy {policy!r} in this installation)")
        return
    row, run = agent_demo(policy, rows, variant=args.variant, alphabet=alphabet)
    print(f"\nagent loop, tool mode ({policy}): [{row.kind}] {row.question.splitlines()[0]}  (truth {row.truth!r})")
    print("\n".join("    " + line for line in format_trace(run).splitlines()))


def _cmd_agent(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from .agent.chat_model import ChatQZoom
    from .agent.graph import build_graph
    from .agent.run import ask_agent, format_trace
    from .images import load_image

    image = load_image(args.image)  # a bad image fails before the model loads
    hf_logging.disable_progress_bar()
    name = args.model or ("zoomworld-tiny-tool" if args.mode == "tool" else "zoomworld-tiny")
    chat = ChatQZoom.from_pretrained(name, max_new_tokens=args.max_new_tokens)
    if chat.model.heads is None:
        raise UsageError(f"{name} has no Q-Zoom heads: neither auto mode nor the zoom tool can run without them")
    run = ask_agent(build_graph(chat, max_turns=args.max_turns), image, args.question, args.mode)
    if args.json:
        print(json.dumps(run.to_json()))
    else:
        print(format_trace(run))
    return 0


def _add_agent(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="answer through the agent loop (auto: the gate zooms; tool: the policy calls "
                                     "the zoom tool) and print the trace")
    p.add_argument("image", help="image file")
    p.add_argument("question", help="the question")
    p.add_argument("--mode", choices=("auto", "tool"), default="tool",
                   help="auto: Q-Zoom's gate splices the RoI in one pass; tool: the policy decides to call zoom")
    p.add_argument("--model", default=None, help="a model, a Q-Zoom checkpoint or a tool-calling policy (default: "
                                                 "zoomworld-tiny-tool in tool mode, zoomworld-tiny in auto mode)")
    p.add_argument("--max-turns", type=_int_at_least(1), default=5, help="policy turns before the loop stops")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=64, help="decoding budget per turn")
    p.add_argument("--json", action="store_true", help="print the run (answer, trace, costs) as one JSON object")
    p.set_defaults(func=_cmd_agent)


def _cmd_serve_mcp(args: argparse.Namespace) -> int:
    from .agent.image_refs import ImageRefPolicy

    if not args.allow_dir:
        raise UsageError("serve-mcp needs --allow-dir DIR: a folder whose images clients may name (repeat it for "
                         "more folders)")
    limits = {k: v for k, v in (("max_bytes", args.max_bytes), ("max_pixels", args.max_pixels)) if v is not None}
    # a missing folder or a bad limit fails here, before the model loads
    policy = ImageRefPolicy(tuple(args.allow_dir), allow_urls=args.allow_urls, **limits)
    if args.transport == "stdio" and (args.host is not None or args.port is not None):
        raise UsageError("--host and --port are for --transport streamable-http; stdio serves on stdin/stdout")
    if args.port is not None and args.port > 65535:
        raise UsageError(f"--port must be in 1-65535, got {args.port}")
    from transformers.utils import logging as hf_logging

    from .agent.mcp_server import build_server, serve
    from .model import QZoomModel

    hf_logging.disable_progress_bar()  # over stdio, stdout carries the protocol: nothing else may be written there
    model = QZoomModel.from_pretrained(args.model)
    serve(build_server(model, policy, extra_modes=_tool_mode(args.policy)), args.transport,
          args.host or "127.0.0.1", args.port or 8000, max_image_bytes=policy.max_bytes)
    return 0


def _tool_mode(name: str | None) -> dict:
    """``ask``'s ``tool`` mode: the agent loop with the tool-calling policy ``name``, when one is installed."""
    from .policy import is_policy

    if not name or not is_policy(name):
        return {}
    from .agent.chat_model import ChatQZoom
    from .agent.graph import build_graph
    from .agent.run import ask_agent

    graph = build_graph(ChatQZoom.from_pretrained(name, max_new_tokens=64, max_sessions=1))
    # the server's lock serialises calls; the loop's own model is the policy, not the server's model
    return {"tool": lambda _model, image, question: ask_agent(graph, image, question, "tool").to_json()}


def _cmd_train(args: argparse.Namespace) -> int:
    if args.stage == "base":  # the bundled model's own recipe, apart from the product's stages
        from .recipes.zoomworld_tiny.cli import cmd_train_base

        return cmd_train_base(args)
    if args.config == DEFAULT_BASE_CONFIG:
        raise UsageError(f"train {args.stage} needs --config (e.g. configs/train/{args.stage}_zoomworld_tiny.yaml)")
    return _TRAIN_STAGES[args.stage](args)


def _train_stage1(args: argparse.Namespace) -> int:
    from .train.stage1 import load_stage1_config, run_stage1

    cfg = load_stage1_config(args.config)
    aux = None
    if cfg.aux_weight > 0:  # the only auxiliary loss there is: ZoomWorld's colour probes
        from .recipes.zoomworld_tiny.twig_aux import TwigAuxProbe as aux
    m = run_stage1(cfg, args.out, max_steps=args.steps, aux=aux)
    print(f"stage 1 (SD-RPN twig) at step {m['step']}: RoI hit rate {m['roi_hit']:.3f} (box covers >= 70% of "
          f"the target, <= 16x its area), coverage {m['roi_coverage']:.3f}, IoU {m['roi_iou']:.3f}; "
          f"{m['usable']}/{m['labelled']} pseudo-labels usable; "
          f"adapter in {os.path.join(args.out, 'stage1', 'qzoom')}")
    for key, label in (("roi_hit_by_family", "family"), ("roi_hit_by_size", "target side in tokens")):
        print(f"  RoI hit by {label}: " + ", ".join(f"{k} {v['hit']:.2f} ({v['n']})" for k, v in m[key].items()))
    print(f"  top token on the target {m['roi_top1']:.2f}, by family: "
          + ", ".join(f"{k} {v['hit']:.2f}" for k, v in m["roi_top1_by_family"].items()))
    return 0


def _train_stage2(args: argparse.Namespace) -> int:
    from .train.stage2 import load_stage2_config, run_stage2

    m = run_stage2(load_stage2_config(args.config), args.out, max_steps=args.steps)
    print(f"stage 2 (post-SFT) at step {m['step']}: {m['hard']} hard cases of {m['mined']}; val accuracy "
          f"direct {m['acc_never']:.3f}, zoomed {m['acc_always']:.3f}, gated {m['acc_auto']:.3f}; "
          f"model in {os.path.join(args.out, 'stage2', 'model')}")
    return 0


def _train_stage3(args: argparse.Namespace) -> int:
    from .train.stage3 import load_stage3_config, run_stage3

    m = run_stage3(load_stage3_config(args.config), args.out, max_steps=args.steps)
    auc = "n/a" if m["gate_auc"] is None else f"{m['gate_auc']:.3f}"
    print(f"stage 3 (gate) at step {m['step']}: AUC {auc} for 'zoom helps' ({m['zoom_helps']} of "
          f"{m['gate_scored']}), coarse skipped {m['coarse_skipped']:.3f}, fine zoomed {m['fine_zoomed']:.3f}; "
          f"{m['transition']} transitions, {m['kept']} kept; "
          f"adapter in {os.path.join(args.out, 'stage3', 'qzoom')}")
    return 0


_TRAIN_STAGES: dict[str, Callable[[argparse.Namespace], int]] = {
    "stage1": _train_stage1, "stage2": _train_stage2, "stage3": _train_stage3,
}


def _add_ask(sub: argparse._SubParsersAction) -> None:
    ask = sub.add_parser("ask", help="answer one question about one image, zooming when the gate says so")
    ask.add_argument("image", help="image file (JPEG, PNG, WebP, TIFF, GIF, ...)")
    ask.add_argument("question", help="the question")
    ask.add_argument("--model", default="zoomworld-tiny", help="model directory or bundled model name")
    ask.add_argument("--qzoom", default=None, help="Q-Zoom adapter or official checkpoint (default: MODEL/qzoom)")
    ask.add_argument("--no-qzoom", action="store_true", help="load no Q-Zoom heads (implies --mode never)")
    ask.add_argument("--mode", choices=["auto", "never", "always"], default=None,
                     help="when to zoom (default: auto with Q-Zoom heads, never without)")
    ask.add_argument("--preset", default=None, help="a task's released thresholds and view budget: doc, chart, ocr, "
                     "hr, textvqa, infovqa, docvqa, chartqa, ocrbench, vstar, mme-realworld, hrbench "
                     "(--max-tokens/--min-tokens still win)")
    ask.add_argument("--max-tokens", type=_positive, default=None, help="max visual tokens per image view")
    ask.add_argument("--min-tokens", type=_positive, default=None, help="min visual tokens per image view")
    ask.add_argument("--max-new-tokens", type=_positive, default=32, help="max generated tokens")
    ask.add_argument("--roi-query", default=None, help="the text the zoom box is found for (default: the question, "
                     "or its text before any answer options when the adapter says roi_query: stem)")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.set_defaults(func=_cmd_ask)


def _add_make_tiny(sub: argparse._SubParsersAction) -> None:
    tiny = sub.add_parser("make-tiny", help="write a tiny random model of a family, loadable offline")
    tiny.add_argument("out_dir", help="output directory")
    tiny.add_argument("--family", choices=["qwen2_5_vl", "qwen3_vl", "llava"], default="qwen2_5_vl")
    tiny.add_argument("--hidden", type=_positive, default=64, help="hidden size (multiple of 16)")
    tiny.add_argument("--layers", type=_positive, default=None, help="language-model layers")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--no-heads", action="store_true", help="do not write Q-Zoom heads (copied from the base)")
    tiny.set_defaults(func=_cmd_make_tiny)


def _add_zoomworld(sub: argparse._SubParsersAction) -> None:
    zw = sub.add_parser("zoomworld", help="write ZoomWorld images, questions and boxes to a folder (resumable)")
    zw.add_argument("--variant", choices=["hr", "doc"], required=True, help="photo-like clutter or page layouts")
    zw.add_argument("--split", choices=["train", "val", "test"], required=True, help="seed range to draw from")
    zw.add_argument("--n", type=_positive, required=True, help="number of samples")
    zw.add_argument("--out", required=True, help="output folder; an interrupted run there is resumed")
    zw.add_argument("--start", type=_non_negative, default=0, help="first sample index")
    zw.add_argument("--alphabet", default="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", help="glyph characters (A-Z0-9)")
    zw.set_defaults(func=_cmd_zoomworld)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="answer a few ZoomWorld test questions and draw boxes and heat maps")
    demo.add_argument("--model", default="zoomworld-tiny", help="model directory or bundled model name")
    demo.add_argument("--n", type=_positive, default=4, help="number of questions")
    demo.add_argument("--variant", choices=["hr", "doc"], default="hr")
    demo.add_argument("--out", default="qzoom-demo.png", help="PNG with boxes and RoI heat maps")
    demo.add_argument("--policy", default="zoomworld-tiny-tool",
                      help="tool-calling policy that answers one question through the agent loop")
    demo.set_defaults(func=_cmd_demo)


def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train Q-Zoom heads (stage1-3) or the bundled zoomworld-tiny (base); "
                           "resumable from OUT")
    train.add_argument("stage", choices=["base", "stage1", "stage2", "stage3"], help="what to train")
    train.add_argument("--config", default=DEFAULT_BASE_CONFIG, help="training YAML")
    train.add_argument("--out", required=True, help="run folder; an interrupted run there resumes")
    train.add_argument("--phase", choices=["1", "2", "3", "4", "all", "export", "tool-policy"], default="all",
                       help="base only: which phase(s) of the recipe ('all' runs phase 4 when the YAML has a "
                            "'grounding:' section); 'export' ships the latest phase's model as fp16")
    train.add_argument("--to", default=None, help="base export destination (default: the bundled zoomworld-tiny)")
    train.add_argument("--from-phase", type=int, choices=[1, 2, 3, 4], default=None,
                       help="export this phase's model (default: the latest of phases 1-3; 4 is the grounded policy)")
    train.add_argument("--steps", type=_positive, default=None, help="stop this phase at this step (resume later)")
    train.set_defaults(func=_cmd_train)


def _add_serve_mcp(sub: argparse._SubParsersAction) -> None:
    mcp = sub.add_parser("serve-mcp", help="serve the zoom and ask tools over MCP (stdio or streamable HTTP)")
    mcp.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                     help="a folder whose images clients may name (repeatable; required); paths are confined to "
                          "these folders by their real paths")
    mcp.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio",
                     help="stdio (the client starts this process) or streamable-http (at http://HOST:PORT/mcp)")
    mcp.add_argument("--host", default=None, help="HTTP interface (default 127.0.0.1); there is no authentication, "
                     "so keep loopback unless something in front authenticates")
    mcp.add_argument("--port", type=_positive, default=None, help="HTTP port (default 8000)")
    mcp.add_argument("--model", default="zoomworld-tiny", help="model directory or bundled model name (loaded "
                     "before serving)")
    mcp.add_argument("--policy", default="zoomworld-tiny-tool",
                     help="tool-calling policy behind ask's mode 'tool' (the agent loop); '' turns that mode off")
    mcp.add_argument("--allow-urls", action="store_true", help="accept file:// URLs under the --allow-dir "
                     "rules (http(s) URLs are refused either way: no remote fetch)")
    mcp.add_argument("--max-bytes", type=_positive, default=None, help="largest encoded image in bytes (default "
                     "32 MiB), checked before reading or decoding")
    mcp.add_argument("--max-pixels", type=_positive, default=None, help="largest image width*height (default 100 "
                     "million), checked from the header before decoding")
    mcp.set_defaults(func=_cmd_serve_mcp)


def build_parser() -> argparse.ArgumentParser:
    """The ``qzoom-agent`` parser: one subcommand per job; errors raise `UsageError` instead of exiting."""
    from .bench.compare_cli import add_compare_parser
    from .bench.scale import add_bench_scale_parser
    from .bench.sweep import add_sweep_parser

    parser = _Parser(prog="qzoom-agent", description="Q-Zoom adaptive perception for vision-language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_ask, _add_agent, _add_make_tiny, _add_zoomworld, _add_demo, _add_train, _add_serve_mcp,
                add_compare_parser, add_sweep_parser, add_bench_scale_parser, _add_grpo):
        add(sub)
    return parser


def _add_grpo(sub: argparse._SubParsersAction) -> None:
    # TRL's own parser reads the recipe (every GRPOConfig field), so everything after `grpo` goes to it untouched.
    p = sub.add_parser("grpo", add_help=False, help="GRPO-train a thinking-with-images policy with a zoom tool in "
                       "the loop (TRL); --config configs/grpo/NAME.yaml, any GRPOConfig field as --FIELD VALUE")
    p.set_defaults(func=_grpo, recipe_args=[])


def _grpo(args: argparse.Namespace) -> int:
    import json

    from .rl.gpu import AcceleratorError
    from .rl.recipe import run

    argv = list(args.recipe_args)
    if not argv:
        argv = ["--help"]
    try:
        summary = run(argv)
    except AcceleratorError as err:
        raise UsageError(str(err)) from None
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `qzoom-agent` console script; returns the exit code."""
    expected: tuple[type[Exception], ...] = (UsageError, ImageLoadError, FileNotFoundError, ValueError)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "grpo":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.recipe_args = extra  # grpo: TRL's parser reads them, in order
        if args.command == "ask" and args.no_qzoom:
            args.mode = "never"
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except expected as err:
        if os.environ.get("QZOOM_DEBUG"):
            raise
        print(f"qzoom-agent: error: {one_line(err) or type(err).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qzoom-agent: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure still gets one line; QZOOM_DEBUG=1 shows the traceback
        if os.environ.get("QZOOM_DEBUG"):
            raise
        print(f"qzoom-agent: internal error: {type(err).__name__}: {one_line(err)} (QZOOM_DEBUG=1 for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
