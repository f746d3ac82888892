"""``qzoom-agent train base``: the phases of the zoomworld-tiny recipe from the command line.

The main CLI hands ``train base`` here, so the product's commands never import the recipe until it is asked for.
"""

from __future__ import annotations

import argparse

from ...checks import UsageError
from ...loading import BUNDLED_MODELS
from ...train.common import read_config
from .answer_config import load_answer_config
from .export import export_model, latest_model
from .grounding import load_grounding_config, run_grounding
from .joint import run_joint
from .run_state import CheckpointMismatchError
from .warmup import load_train_config, run_warmup


def cmd_train_base(args: argparse.Namespace) -> int:
    """Run ``--phase`` (1-4, all or export) of the recipe in ``--config`` into ``--out``; prints what each phase
    reached and returns 0.

    Raises:
        UsageError: options that do not go together, or a run folder written under another config.
    """
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


