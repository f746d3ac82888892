"""The reference texts of the external-crop dialects (`tools.dialects`), quoted with their file:line.

Typos ("the the", "Countinue", "outputing") are the references' own: a policy trained on these strings expects them.
"""

from __future__ import annotations

import json
from typing import Any

# DeepEyes prompt.py (6c5e796) L60, appended to the question and repeated in every tool response.
USER_PROMPT_V2 = ("\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  "
                  "<think>...</think>  <tool_call>...</tool_call> (if tools needed)  <answer>...</answer> ")
# Mini-o3 verl/trainer/constants.py L1, L7, L9 ("the the" and "Countinue" are theirs).
MINIO3_SYSTEM = (
    "You are a helpful assistant. Answer the user's question based on the image provided. Output your thinking "
    "process within the <think> and </think> tags. Whenever you find anything unclear, you can zoom in a specific "
    "region in the given image to see more clearly by outputing <grounding>{\"bbox_2d\": [x0, y0, x1, y1], "
    "\"source\": \"original_image\"}</grounding>, where (x0, y0) and (x1, y1) are the top-left and bottom-right "
    "coordinates of the region that you want to zoom in, respectively (suppose the width and height of the image "
    "are 1.0), and 'source' refers to the image that you zoom in and could be either 'original_image' or "
    "'observation_i'. Once the final answer is confirmed, put it within <answer> and </answer>.")
MINIO3_OBSERVATION = "After the above Action {action}, here is the the zoom-in image (Observation {observation}):\n"
MINIO3_CONTINUE = (".\nContinue your reasoning process inside <think> and </think>. If needed, you can continue to "
                   "zoom in on the original image or any of the observations, by outputting <grounding> and "
                   "</grounding> as before. If the final answer is confirmed, put your final answer inside <answer> "
                   "and </answer>.")
MINIO3_ERROR = ("Please analyze the error information obtained from the function tool and adjust your response. "
                "Countinue your reasoning process inside <think> and </think>.")
# Pixel-Reasoner prompts_dataset.py L37 ("vcot"), appended to the question as "\n\n" + template.
PIXELREASONER_GUIDELINES = (
    "\n\n\n\nGuidelines: Understand the given visual information and the user query. Determine if it is beneficial "
    "to employ the given visual operations (tools). For a video, we can look closer by `select_frames`. For an "
    "image, we can look closer by `crop_image`. Reason with the visual information step by step, and put your final "
    "answer within \\boxed{}.")
CROP_NORMALIZED = "crop_image_normalized"
# Pixel-Reasoner experience_maker.py, CropImageNormalized.parameters (its function schema, verbatim).
CROP_NORMALIZED_SCHEMA: dict[str, Any] = {"type": "function", "function": {
    "name": CROP_NORMALIZED,
    "description": "Zoom in on the image based on the bounding box coordinates. It is useful when the object or text "
                   "in the image is too small to be seen.",
    "parameters": {"type": "object", "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "number"},
                    "description": "coordinates for bounding box of the area you want to zoom in. Values should be "
                                   "within [0.0,1.0]."},
        "target_image": {"type": "number",
                         "description": "The index of the image to crop. Index from 1 to the number of images. "
                                        "Choose 1 to operate on original image."}},
        "required": ["bbox_2d", "target_image"]}}}


def deepeyes_system(schema: dict[str, Any]) -> str:
    """DeepEyes' SYSTEM_PROMPT_V2 (prompt.py L40-58, layout and example verbatim) listing ``schema``."""
    tools = json.dumps(schema, separators=(",", ":"))
    example = json.dumps({"name": "image_zoom_in_tool",
                          "arguments": {"bbox_2d": [10, 20, 100, 200], "label": "the apple on the desk"}})
    return ("You are a helpful assistant.\n\n# Tools\nYou may call one or more functions to assist with the user "
            "query.\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{tools}\n</tools>\n\n# How to call a tool\nReturn a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            f"<args-json-object>}}\n</tool_call>\n\n**Example**:  \n<tool_call>  \n{example}  \n</tool_call>")


def hermes_call(name: str, arguments: dict[str, Any]) -> str:
    """A Hermes tool call as a policy writes it (and as Qwen chat templates render ``tool_calls``)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"
