"""`qzoom-agent bench-scale`: latency of the Q-Zoom mechanism at the real sizes of its backbones.

What is timed, per visual-token budget B (a synthetic image sized so that the global view has exactly B tokens),
as medians over ``--rounds`` rounds after one warm-up pass of every variant, the variants interleaved in each round
(their order rotating round by round) so machine drift cancels in the ratios at one budget:

* ``plain_prefill``: the model's own forward over the image and question (last-token logits).
* ``plain_answer``: the model's own ``generate``, greedy, exactly N new tokens (``min_new_tokens = N``).
* ``qzoom_rate0``: the Q-Zoom answer when the gate does not fire: layers below K and the gate (``perceive``),
  layers K..L-1 (``look``), N tokens decoded.
* ``qzoom_rate1``: the Q-Zoom answer when it fires: layers below K, the gate and the twig, then the RoI pass
  (``zoom``: crop, encode, the tail below K on the cached prefix, layers K..L-1 over the spliced sequence), N
  tokens decoded. The box is fixed, not the twig's (random weights give a random box): the centred box of half
  the image's width and height, so the RoI pass costs the same every time; its token count is reported.
* rate 0.5 is not run: it is the mean of the two measured paths (half the questions take each).

Both sides take the image through the library's ``load_image`` and the adapter's resize, as a served request
would (the paper's protocol: batch 1, sdpa, wall time around the whole answer, after a warm-up). Derived: decode
time per token (rate 0's decode over its N-1 single-token steps), the extra cost of the gate and of the twig
against the plain prefill of the same input, and the speed-up ratios (`scale_report`). Weights are random: latency
depends on the shapes, not on the values. Architectures and sizes: `scale_archs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import math
import sys
from pathlib import Path
from typing import Any

from ..checks import UsageError
from .scale_archs import ARCHS, SIZE_NAMES

logger = logging.getLogger(__name__)

ALL_BUDGETS = (256, 576, 1024, 2048, 4096, 8192, 16384)
# CPU defaults stop where a round gets too slow on a few cores (see docs/bench_scale.md).
DEFAULT_BUDGETS = {"cuda": ALL_BUDGETS, "cpu": (256, 576, 1024, 2048, 4096)}
TINY_BUDGETS = (64, 256)
MAX_GRID_ASPECT = 4  # a budget must tile a near-square grid of exactly that many tokens
ATTENTIONS = ("sdpa", "flash_attention_2")


@dataclasses.dataclass
class ScaleConfig:
    """A validated `bench-scale` run (see `add_bench_scale_parser` for each option)."""

    arch: str = "qwen2_5_vl_7b"
    size: str = "medium"
    budgets: tuple[int, ...] = TINY_BUDGETS
    rounds: int = 5
    new_tokens: int = 16
    device: str = "auto"
    attn: str = "auto"
    source_scale: float = 1.0
    qzoom_budget: int = 576
    plain_budget: int = 4096
    seed: int = 0
    out: str | None = None


def grid_for(budget: int) -> tuple[int, int]:
    """The most square ``(rows, cols)`` grid of exactly ``budget`` tokens (rows <= cols).

    Raises:
        UsageError: when no grid of aspect at most `MAX_GRID_ASPECT` has exactly ``budget`` tokens (e.g. a prime).
    """
    rows = max(r for r in range(1, math.isqrt(budget) + 1) if budget % r == 0)
    cols = budget // rows
    if cols > MAX_GRID_ASPECT * rows:
        raise UsageError(f"budget {budget} does not tile a near-square grid of exactly {budget} tokens (best "
                         f"{rows}x{cols}); use a budget such as 576 = 24x24 or 2048 = 32x64")
    return rows, cols


def attention_plan(requested: str, cuda: bool) -> tuple[list[str], dict[str, str]]:
    """The attention implementations to time and, by name, why any asked for was skipped.

    ``auto`` is sdpa plus flash_attention_2 where it can run (on CUDA, with the ``flash_attn`` package)."""
    wanted = list(ATTENTIONS) if requested == "auto" else [a.strip() for a in requested.split(",") if a.strip()]
    if not wanted or any(a not in ATTENTIONS for a in wanted):
        raise UsageError(f"--attn must be auto or a comma list of {', '.join(ATTENTIONS)}, got {requested!r}")
    skipped = {}
    if "flash_attention_2" in wanted:
        if importlib.util.find_spec("flash_attn") is None:
            skipped["flash_attention_2"] = "the flash-attn package is not installed"
        elif not cuda:
            skipped["flash_attention_2"] = "flash-attn runs on CUDA only"
    run = [a for a in dict.fromkeys(wanted) if a not in skipped]
    if not run:
        raise UsageError(f"no attention implementation can run here: {'; '.join(skipped.values())}")
    return run, skipped


def run_scale(cfg: ScaleConfig) -> dict[str, Any]:
    """Build the model, time every (attention, budget), write ``scale.json`` after each budget (and, at the end,
    ``scale.md`` and ``bench_scale.png``) into ``cfg.out``; returns the result (`scale_report`).

    Raises:
        UsageError: bad input, or out of memory (naming the budget; the rows before it stay in scale.json).
    """
    from tqdm import tqdm

    from ..loading import resolve_device
    from . import scale_report, scale_run
    from .scale_archs import arch_spec, parameter_counts

    spec = arch_spec(cfg.arch, cfg.size)
    device = scale_run.resolve_device(cfg.device)
    _, dtype = resolve_device(device.type)  # bf16 on CUDA, fp32 on the CPU: the library's rule
    attns, skipped = attention_plan(cfg.attn, device.type == "cuda")
    for name, why in skipped.items():
        logger.warning("%s skipped: %s", name, why)
    result = scale_report.new_result(cfg, spec, device, dtype, attns, skipped, parameter_counts(spec))
    out = Path(cfg.out) if cfg.out else None
    gib = scale_run.check_memory(spec, device, dtype)
    logger.info("building %s (%s) on %s in %s: about %.1f GiB of weights", spec.arch, spec.size, device, dtype, gib)
    qm = scale_run.build_model(spec, device, dtype, cfg.seed)
    clock = scale_run.Clock(device)
    settings = dict(rounds=cfg.rounds, new_tokens=cfg.new_tokens, source_scale=cfg.source_scale, seed=cfg.seed,
                    clock=clock)
    with tqdm(total=len(attns) * len(cfg.budgets) * (cfg.rounds + 1), unit="pass", file=sys.stderr,
              desc="bench-scale", disable=None) as bar:
        for attn in attns:
            scale_run.set_attention(qm, attn)
            for budget in cfg.budgets:
                bar.set_description(f"bench-scale {attn} {budget} tok")
                try:
                    row = scale_run.measure_on_device(qm, budget, grid_for(budget), device, bar=bar, **settings)
                except Exception as err:
                    if not scale_run.is_oom(err):
                        raise
                    scale_run.free_memory(device)
                    _stop_out_of_memory(result, cfg, attn, budget, out)
                result["rows"].append({"attn": attn, **row})
                if out is not None:
                    scale_report.write_json(result, out)
    scale_report.finish(result)
    if out is not None:
        scale_report.write_outputs(result, out)
    return result


def _stop_out_of_memory(result: dict[str, Any], cfg: ScaleConfig, attn: str, budget: int, out: Path | None) -> None:
    """Save what was measured, with the error, and raise the one-line `UsageError` naming the budget."""
    from . import scale_report

    result["error"] = f"out of memory at budget {budget} ({attn})"
    scale_report.finish(result)
    where = ""
    if out is not None:
        scale_report.write_outputs(result, out)
        where = f"; the {len(result['rows'])} rows measured before it are in {out / scale_report.JSON}"
    raise UsageError(f"out of memory at budget {budget} tokens ({attn}, {cfg.arch} {cfg.size}){where}")


def parse_budgets(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    """``--budgets`` ("576,4096") as sorted unique token counts, each tiling a near-square grid; None: ``default``.

    Raises:
        UsageError: a value that is not a positive integer, or a budget without such a grid.
    """
    if text is None:
        return default
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UsageError(f"--budgets must be positive integers separated by commas, got {text!r}") from None
    if not values or values[0] < 1:
        raise UsageError(f"--budgets must be positive integers separated by commas, got {text!r}")
    for budget in values:
        grid_for(budget)
    return tuple(values)


def config_from_args(args: argparse.Namespace) -> ScaleConfig:
    """A checked `ScaleConfig` from the parsed options (the defaults of ``--budgets`` depend on device and size)."""
    if args.new_tokens < 2:
        raise UsageError(f"--new-tokens must be at least 2 (decode time per token needs a decode step), got "
                         f"{args.new_tokens}")
    if not args.source_scale >= 1.0:
        raise UsageError(f"--source-scale must be at least 1 (the view must not upscale), got {args.source_scale}")
    from .scale_run import resolve_device

    device = resolve_device(args.device)
    default = TINY_BUDGETS if args.size == "tiny" else DEFAULT_BUDGETS[device.type]
    return ScaleConfig(arch=args.arch, size=args.size, budgets=parse_budgets(args.budgets, default),
                       rounds=args.rounds, new_tokens=args.new_tokens, device=args.device, attn=args.attn,
                       source_scale=args.source_scale, qzoom_budget=args.qzoom_budget,
                       plain_budget=args.plain_budget, seed=args.seed, out=args.out)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_bench_scale_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench-scale`` on the CLI's subparsers."""
    p = subparsers.add_parser("bench-scale", help="latency of plain vs Q-Zoom answers against the visual-token "
                              "budget, on Qwen2.5-VL-7B / Qwen3-VL-4B architectures with random weights")
    p.add_argument("--arch", choices=ARCHS, default="qwen2_5_vl_7b", help="architecture (real config, in code)")
    p.add_argument("--size", choices=SIZE_NAMES, default="medium", help="full: the real size (GPU, bf16); medium: "
                   "hidden 1024, 16-18 layers, for CPU; tiny: for tests")
    p.add_argument("--budgets", default=None, help="visual tokens of the global view, comma-separated (default: "
                   f"{','.join(map(str, ALL_BUDGETS))} on CUDA, {','.join(map(str, DEFAULT_BUDGETS['cpu']))} on "
                   f"CPU, {','.join(map(str, TINY_BUDGETS))} for --size tiny)")
    p.add_argument("--rounds", type=_positive, default=5, help="timed rounds per budget, after one warm-up")
    p.add_argument("--new-tokens", type=_positive, default=16, help="tokens every answer decodes (at least 2)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--attn", default="auto", help="auto (sdpa, plus flash_attention_2 where flash-attn runs), or "
                   "a comma list of sdpa, flash_attention_2")
    p.add_argument("--source-scale", type=float, default=1.0, help="source image side over the view's: 1 gives a "
                   "quarter-area RoI of a quarter of the budget (at least min(256, budget)); 2 fills the budget")
    p.add_argument("--qzoom-budget", type=_positive, default=576, help="Q-Zoom's budget in the speed-up ratio")
    p.add_argument("--plain-budget", type=_positive, default=4096, help="the plain model's budget in the ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    p.add_argument("--out", default=None, help="folder for scale.json, scale.md and bench_scale.png")
    p.set_defaults(func=cmd_bench_scale)
    return p


def cmd_bench_scale(args: argparse.Namespace) -> int:
    """Run `bench-scale` and print the report (markdown) to stdout."""
    from transformers.utils import logging as hf_logging

    from . import scale_report

    hf_logging.disable_progress_bar()
    cfg = config_from_args(args)
    result = run_scale(cfg)
    print(scale_report.markdown(result))  # noqa: T201 - CLI output
    if cfg.out:
        print(f"wrote {Path(cfg.out) / scale_report.JSON}, {scale_report.MARKDOWN} and {scale_report.PNG}",  # noqa: T201 - CLI output
              file=sys.stderr)
    return 0
