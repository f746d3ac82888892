"""Keep loss: the language model's image-token states must stay readable by the tower's probe.

Measured on the shipped ``zoomworld-tiny`` (coarse colour questions, whole scenes at <= 256 tokens): the colour of
a large object explains 65% of the variance of its tokens as the tower hands them over, and 18% after the first
decoder layer, 14% by the input of the last. Only that last layer's attention reads the image from the answer
position (heads 2 and 3 put all their mass there, half of it on the asked object), so what it reads has mostly
lost the colour; the model answers every colour question with one word. The first bundled model read the image
from layer 0, where colour is intact, and named colours far better.

The loss asks each chosen layer's input, at the image positions of the examples with per-token targets, to
still give the tower probe's answers: the probe's cross-entropies (`dense_probe.dense_losses`) on those states,
with the probe's weights detached. The probe stays what phase 1 and the aux loss made it, and only the language
model moves, towards keeping what the tower found in its residual stream instead of overwriting it.

Measured (``configs/recipes/zoomworld_tiny/keep.yaml``, ``research/value_path.py``): it keeps colour (66% of the
object tokens' variance at the last layer's input, against 14%), yet the answers stay "red" and reading drops, so
what the states hold is not what stops the model naming colours. It stays an option, off by default.
"""

from __future__ import annotations

import torch

from .dense_probe import DenseProbe, DenseTargets, dense_losses


def keep_losses(hidden_states: tuple[torch.Tensor, ...], image_positions: list[torch.Tensor], rows: list[int],
                targets: DenseTargets, probe: DenseProbe, layers: list[int],
                weights: dict[str, float]) -> torch.Tensor:
    """Mean over ``layers`` of the frozen probe's loss on the image-token states entering each layer.

    Args:
        hidden_states: the forward's ``output_hidden_states``: index 0 the embeddings, index ``l`` the input of
            decoder layer ``l``; each (B, L, dim).
        image_positions: per example of the batch, (N_i,) sequence positions of its visual tokens in raster order.
        rows: the batch rows with targets, in the order ``targets`` concatenates them.
        targets: per-token targets of those rows' visual tokens.
        probe: the tower's dense probe (its weights are not trained by this loss).
        layers: decoder layers (>= 1) whose inputs are read.
        weights: weight per target kind, as for the aux loss.

    Returns:
        Scalar loss.
    """
    if not layers or min(layers) < 1 or max(layers) >= len(hidden_states):
        raise ValueError(f"keep_layers {layers} must lie in 1..{len(hidden_states) - 1}")
    losses = []
    for layer in layers:
        feats = torch.cat([hidden_states[layer][r, image_positions[r]] for r in rows])
        losses.append(dense_losses(probe(feats.float(), frozen=True), targets, weights)["total"])
    return torch.stack(losses).mean()
