"""Where a recipe runs, and the GPU paths' requirements, checked before any model is built.

A recipe that asks for vLLM (``use_vllm: true``) or a GPU (``use_cpu: false``) on a machine without them stops at
once with what to install or change, instead of failing minutes later inside TRL. The GPU install is its own set of
pins (``pip install -e ".[gpu]" -c configs/gpu-constraints.txt``): vLLM 0.34 needs ``torch==2.14`` and
``transformers<5.23``, which the CPU install does not use.
"""

from __future__ import annotations

import importlib.util
from typing import Any

GPU_INSTALL = 'pip install -e ".[gpu]" -c configs/gpu-constraints.txt'


class AcceleratorError(RuntimeError):
    """The recipe needs hardware or packages this machine lacks; the message says which and what to do."""


def check_accelerator(args: Any, *, cuda_available: bool | None = None, vllm_installed: bool | None = None) -> str:
    """The device the policy loads on ("cpu" or "cuda"), after checking the recipe can run here.

    Args:
        args: the recipe's `trl.GRPOConfig`.
        cuda_available: override of ``torch.cuda.is_available()`` (tests).
        vllm_installed: override of whether ``vllm`` is importable (tests).

    Raises:
        AcceleratorError: vLLM requested without vLLM or CUDA, or a GPU recipe on a machine without CUDA.

    Examples:
        >>> from types import SimpleNamespace
        >>> check_accelerator(SimpleNamespace(use_cpu=True, use_vllm=False), cuda_available=False)
        'cpu'
        >>> check_accelerator(SimpleNamespace(use_cpu=False, use_vllm=True, vllm_mode="server"),
        ...                   cuda_available=False, vllm_installed=False)
        Traceback (most recent call last):
        ...
        qzoom_agent.rl.gpu.AcceleratorError: use_vllm: true needs the vllm package, which is not installed; ...
    """
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if vllm_installed is None:
        vllm_installed = importlib.util.find_spec("vllm") is not None
    if getattr(args, "use_vllm", False):
        if not vllm_installed:
            raise AcceleratorError(f"use_vllm: true needs the vllm package, which is not installed; on a GPU node "
                                   f"run: {GPU_INSTALL} (or set use_vllm: false to generate with transformers)")
        if not cuda_available:
            raise AcceleratorError(f"use_vllm: true (vllm_mode {getattr(args, 'vllm_mode', '?')}) needs a CUDA GPU, "
                                   "and none is visible here; run this recipe on a GPU node or use a *_cpu recipe")
    if getattr(args, "use_cpu", False):
        return "cpu"
    if not cuda_available:
        raise AcceleratorError("this recipe trains on a GPU (use_cpu: false) and no CUDA GPU is visible; run it on "
                               "a GPU node, or pass --use_cpu true --bf16 false to try it on this CPU")
    return "cuda"


def check_zero_stage(environ: dict[str, str] | None = None) -> None:
    """Refuse DeepSpeed ZeRO-3, under which these recipes cannot run correctly yet.

    The internal zoom runs the policy's lower layers once per call, and the number of calls differs between ranks,
    while ZeRO-3 makes every rank join each forward to gather the sharded weights (a hang); and the policy delta
    and the held-out evaluation read the weights on the main process alone, where ZeRO-3 holds only its shard.
    ZeRO-2 (``configs/accelerate/zero2.yaml``) keeps the weights whole on every rank.

    Raises:
        AcceleratorError: ``ACCELERATE_DEEPSPEED_ZERO_STAGE`` is 3.
    """
    import os

    env = os.environ if environ is None else environ
    if str(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")).strip() == "3":
        raise AcceleratorError("DeepSpeed ZeRO-3 is not supported by the GRPO recipes (zoom calls differ between "
                               "ranks, and the policy is saved from the main process); launch with "
                               "configs/accelerate/zero2.yaml")
