"""Tool-calling policies stored as a small delta on a base model: the decoder above layer K, and the chat settings.

A policy that calls the zoom tool is the base VLM fine-tuned to decide, from its own first prefill, whether to call
``zoom`` and then to answer from the crop. The layers below K, the embeddings and the vision tower stay frozen, so
the layer-K hidden states that the Q-Zoom heads read are the base model's: the gate and the twig work unchanged on
the policy, and the policy's first prefill *is* the perception. Only the trained tensors are stored (fp16), beside
``policy.json``:

    policy.json          {"format": "qzoom-policy", "base": ..., "system": ..., "list_tools": ..., "call": ...,
                          "trained": [...]}
    policy.safetensors   the trained tensors, named as in the base model's state dict
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from .head_io import SAFETENSORS_META, atomic_write, read_json, savable, write_json

POLICY_FORMAT = "qzoom-policy"
POLICY_CONFIG = "policy.json"
POLICY_WEIGHTS = "policy.safetensors"
_ASSETS = Path(__file__).parent / "assets" / "zoomworld-tiny"
BUNDLED_POLICIES = {
    "zoomworld-tiny-tool": _ASSETS / "policy",  # calls the internal zoom (tool mode, agent qzoom-tool)
    "zoomworld-tiny-deepeyes": _ASSETS / "policy-deepeyes",  # writes DeepEyes' box call (agents deepeyes[-cached])
}


class PolicyConfig(BaseModel):
    """How a policy was trained to be prompted."""

    model_config = ConfigDict(extra="forbid")

    format: str = Field(POLICY_FORMAT, description="always 'qzoom-policy'")
    base: str = Field(description="the base model (a bundled name or a path) the delta applies to")
    system: str | None = Field(None, description="the system prompt the policy was trained with; None: none")
    list_tools: bool = Field(False, description="whether the chat template listed the tools' schemas in training")
    call: Literal["zoom", "crop"] = Field("zoom", description="the tool it calls: 'zoom' (the internal zoom, no "
                                          "arguments) or 'crop' (DeepEyes' image_zoom_in_tool, bbox_2d in pixels "
                                          "of the resized view, the crop returned alone in a tool turn)")
    frozen_below: int = Field(ge=0, description="decoder layers below this index kept the base weights (K)")
    trained: list[str] = Field(default_factory=list, description="state-dict prefixes of the trained tensors")
    notes: str = Field("", description="how it was trained and what it measured")


def resolve_policy_path(name: str | Path) -> Path:
    """A policy directory for ``name``: a bundled policy name or a path holding ``policy.json``."""
    path = BUNDLED_POLICIES.get(str(name), Path(name).expanduser())
    if not (path / POLICY_CONFIG).is_file():
        raise FileNotFoundError(f"no tool-calling policy at {path} (expected {POLICY_CONFIG}); pass a policy "
                                f"directory or one of {sorted(BUNDLED_POLICIES)}")
    return path


def is_policy(name: str | Path) -> bool:
    """Whether ``name`` names an installed policy (a bundled one, or a directory with ``policy.json``)."""
    path = BUNDLED_POLICIES.get(str(name), Path(name).expanduser())
    return (path / POLICY_CONFIG).is_file()


def policy_base(name: str | Path) -> str:
    """The base model ``name`` stands on: itself, or the base a policy delta applies to (a policy can also be a
    `compare` model or the start of further training)."""
    return read_policy(resolve_policy_path(name))[0].base if is_policy(name) else str(name)


def above_k_prefixes(model: Any) -> list[str]:
    """State-dict prefixes of what a policy trains on ``model`` (a `QZoomModel`; not imported, as model.py imports
    this module): the decoder layers from ``twig_K`` up, the final norm, and the LM head unless it is tied to the
    token embeddings (which the Q-Zoom heads' input depends on)."""
    a, hf = model.adapter, model.adapter.model
    names = {id(m): name for name, m in hf.named_modules()}
    layers = names[id(a.layers)]
    prefixes = [f"{layers}.{i}." for i in range(model.config.twig_K, a.num_layers)] + [names[id(a.norm)] + "."]
    if a.lm_head.weight is not a.embed_tokens.weight:
        prefixes.append(names[id(a.lm_head)] + ".")
    return prefixes


def read_policy(path: Path) -> tuple[PolicyConfig, dict[str, torch.Tensor]]:
    """The policy's config and tensors."""
    cfg = PolicyConfig.model_validate(read_json(path / POLICY_CONFIG, "policy config"))
    if cfg.format != POLICY_FORMAT:
        raise ValueError(f"{path / POLICY_CONFIG}: format {cfg.format!r} is not {POLICY_FORMAT!r}")
    return cfg, load_file(str(path / POLICY_WEIGHTS))


def apply_policy(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load the policy tensors into the base HF ``model`` in place, cast to its dtype.

    Raises:
        ValueError: a tensor the base model lacks or whose shape differs (a policy for another base).
    """
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ValueError(f"policy tensors in {source} are not in the base model: {unknown[:3]}; the policy was "
                         "trained on another base")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"policy tensor {key} in {source} has shape {tuple(value.shape)}, the base model's is "
                             f"{tuple(own[key].shape)}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))


def write_policy(model: torch.nn.Module, out: Path, cfg: PolicyConfig) -> Path:
    """Write the tensors of ``model`` under ``cfg.trained`` (fp16) and ``policy.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() for k, v in model.state_dict().items() if any(k.startswith(p) for p in cfg.trained)}
    if not state:
        raise ValueError(f"no tensor of the model starts with {cfg.trained}")
    atomic_write(out / POLICY_WEIGHTS, lambda tmp: save_file(savable(state), tmp, metadata=SAFETENSORS_META))
    write_json(out / POLICY_CONFIG, cfg.model_dump())
    return out
