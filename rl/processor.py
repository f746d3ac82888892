"""The processor TRL's `GRPOTrainer` renders and tokenises rollouts with, built to match the agent loop's rendering.

Three things differ from a stock Qwen processor, each so that a GRPO rollout is tokenised as `qzoom_agent.chat`
renders the same conversation at inference:

* **Image sizes.** The image processor returns torch tensors (TRL 1.16 crashes on a tool turn in which no rollout
  got an image back when they are numpy arrays) and resizes into ``[4, max_tokens]`` visual tokens: a row's large
  image lands at the model's budget exactly as `ChatSession` sizes it, and a tool's crop, already sized by the tool
  (at most ``view_tokens``), keeps its size as in the agent's tool turns (`chat.ToolImageBudget`).
* **The chat template.** The one the agent loop renders with (`BackboneAdapter.render_chat`: the model's own when it
  shows images in tool turns, else TRL's Qwen3-VL template), with the tool listing switched off for a policy trained
  without it (``policy.json``: ``list_tools``). TRL's Hermes response template parses the calls.
* **The end of a call.** When ``</tool_call>`` is one token, it is the tokenizer's end-of-sequence for TRL: generation
  stops at a call as the agent loop stops there (`agent.chat_model.TOOL_STOP`), and TRL, which cuts the tool turn's
  rendering after the last end-of-sequence of the call turn, then appends ``<|im_end|>`` and the tool turn after
  the call exactly as the template renders the whole conversation. The model's own end-of-turn ids still end the
  answer turn (TRL adds the generation config's ``eos_token_id``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from ..model import QZoomModel

CALL_END = "</tool_call>"
MIN_TOOL_TOKENS = 4  # the agent loop's smallest tool-turn image (chat.ToolImageBudget)


def tensor_image_processor(base: type) -> type:
    """``base`` (an image processor class) returning torch tensors when no ``return_tensors`` is given."""

    class TensorImageProcessor(base):  # type: ignore[misc, valid-type]
        """Returns torch tensors when no ``return_tensors`` is given (see the module docstring)."""

        def __call__(self, images: Any, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("return_tensors") is None:
                kwargs["return_tensors"] = "pt"
            return super().__call__(images, *args, **kwargs)

    return TensorImageProcessor


def no_video_processor(base: type) -> type:
    """``base`` (a processor class) built and saved without a video processor, which needs torchvision."""

    class NoVideoProcessor(base):  # type: ignore[misc, valid-type]
        """The processor without a video processor, which needs torchvision."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory: Any, **kwargs: Any) -> list[str]:
            # The stock method walks every attribute, the absent video processor included (AttributeError on
            # None); a checkpoint needs the tokenizer (with the chat template) and the image processor.
            return [*self.tokenizer.save_pretrained(save_directory),
                    *self.image_processor.save_pretrained(save_directory)]

    return NoVideoProcessor


def chat_template_for(model: QZoomModel, choice: str, list_tools: bool) -> str:
    """The template text: ``model`` (what the agent loop renders with) or ``qwen3_vl`` (TRL's), with the tool
    listing switched off when ``list_tools`` is False (the template then ignores the ``tools`` TRL passes)."""
    a = model.adapter
    if choice == "qwen3_vl":
        from trl.chat_template_utils import qwen3_vl_chat_template

        template = qwen3_vl_chat_template
    else:
        template = a._tool_template() or a.tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise ValueError("the model's tokenizer has no chat template; set chat_template: qwen3_vl")
    return template if list_tools else "{%- set tools = none %}" + template


def grpo_processor(model: QZoomModel, *, chat_template: str = "model", list_tools: bool = False) -> Any:
    """A processor for ``GRPOTrainer(processing_class=...)`` over ``model``'s tokenizer and image settings.

    Args:
        model: the policy (a Qwen2.5-VL or Qwen3-VL backbone).
        chat_template: ``model`` or ``qwen3_vl`` (see `chat_template_for`).
        list_tools: list the tools' schemas in the prompt.

    Raises:
        ValueError: a backbone whose tool turns TRL 1.16 cannot train on (LLaVA: its ``<image>`` tokens in tool turns
            are not marked as images).
    """
    from trl.chat_template_utils import qwen3_template

    a = model.adapter
    if a.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Processor
    elif a.family == "qwen3_vl":
        from transformers import Qwen3VLProcessor as Processor
    else:
        raise ValueError(f"GRPO with image-returning tools needs a Qwen2.5-VL or Qwen3-VL backbone; {a.family!r} "
                         "tool-turn images are not marked as images by TRL 1.16")
    src = a.image_processor
    vc = a.model.config.vision_config
    f = a.px_per_token
    image_processor = tensor_image_processor(type(src))(
        size={"shortest_edge": MIN_TOOL_TOKENS * f * f, "longest_edge": model.config.max_tokens * f * f},
        patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
        image_mean=src.image_mean, image_std=src.image_std)
    tokenizer = copy.deepcopy(a.tokenizer)  # TRL sets templates on it; the model's own tokenizer stays as it was
    tokenizer.response_template = qwen3_template
    call_end = tokenizer.convert_tokens_to_ids(CALL_END)
    if isinstance(call_end, int) and call_end != tokenizer.unk_token_id and tokenizer.decode([call_end]) == CALL_END:
        tokenizer.eos_token = CALL_END
    template = chat_template_for(model, chat_template, list_tools)
    tokenizer.chat_template = template
    return no_video_processor(Processor)(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                chat_template=template)


def view_size_of(model: QZoomModel) -> Any:
    """The size the GRPO processor shows a row's image at (absolute crop boxes are in these pixels)."""
    from ..images import fit_to_token_budget

    f = model.adapter.px_per_token
    cfg = model.config

    def size(image: Image.Image) -> tuple[int, int]:
        return fit_to_token_budget(image.width, image.height, factor=f, min_tokens=MIN_TOOL_TOKENS,
                                   max_tokens=cfg.max_tokens)

    return size
