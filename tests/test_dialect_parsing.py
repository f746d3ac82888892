"""The external-crop dialects (tools.dialects) reading policy turns: malformed call texts per dialect, answers and
episode rules, format_call round trips, and parse never raising on garbage. Boxes, replies and crops:
test_dialects.py."""

from __future__ import annotations

import json

import pytest
from dialect_helpers import BIG, SETTINGS
from hypothesis import given
from hypothesis import strategies as st
from qzoom_agent.tools.dialects import (
    DIALECTS,
    Call,
    DeepEyesDialect,
    Turn,
    get_dialect,
)

# ---- parsing ----

def _hermes(args, name="image_zoom_in_tool"):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


CALL = _hermes({"bbox_2d": [10, 20, 300, 400]})
CALL2 = _hermes({"bbox_2d": [50, 60, 500, 600], "label": "tag"})
DEEP = '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": ' + "[" * 100_000 + "]" * 100_000 + "}}"
NESTED = {"bbox_2d": [[[[[[[[1]]]]]]], 0, 1, 1]}

HERMES_TEXTS = [  # shared by deepeyes and qwen3vl: (id, text, expected Turn or error substring)
    ("plain call", "I will zoom. " + CALL, Turn(call=Call((10.0, 20.0, 300.0, 400.0)))),
    ("missing closing tag at the end", CALL.removesuffix("\n</tool_call>"), Turn(call=Call((10, 20, 300, 400)))),
    ("missing closing tag, then prose", CALL.removesuffix("\n</tool_call>") + " and more", "not valid JSON"),
    ("two calls: the last runs", CALL + "\n" + CALL2, Turn(call=Call((50, 60, 500, 600), "tag"))),
    ("answer before a call", "<answer>B</answer> " + CALL, Turn(answer="B")),
    ("answer after a call", CALL + " <answer> 42 </answer>", Turn(answer="42")),
    ("two answers: the last", "<answer>1</answer><answer>2</answer>", Turn(answer="2")),
    ("an empty answer is none", "<answer></answer>" + CALL, Turn(call=Call((10, 20, 300, 400)))),
    ("an unclosed answer is none", "<answer>7", Turn()),
    ("neither", "The tag says 7.", Turn()),
    ("empty call", "<tool_call></tool_call>", "empty"),
    ("whitespace call", "<tool_call>\n \n</tool_call>", "empty"),
    ("wrong tool name", _hermes({"bbox_2d": [0, 0, 9, 9]}, "crop"), "unknown tool 'crop'"),
    ("arguments as a string", _hermes('{"bbox_2d": [0, 0, 9, 9]}'), "arguments must be a JSON object"),
    ("no arguments", '<tool_call>{"name": "image_zoom_in_tool"}</tool_call>', "arguments must be"),
    ("missing bbox_2d", _hermes({"bbox": [0, 0, 9, 9]}), "need bbox_2d"),
    ("not an object", "<tool_call>[1, 2]</tool_call>", "the call must be"),
    ("unparsable JSON", "<tool_call>{bad json}</tool_call>", "not valid JSON"),
    ("a 400-digit number", _hermes({"bbox_2d": [0, 0, BIG, 9]}), "finite"),
    ("a 5000-digit number", CALL.replace("300", "9" * 5000), "not valid JSON"),
    ("1e999", CALL.replace("300", "1e999"), "finite"),
    ("NaN", CALL.replace("300", "NaN"), "finite"),
    ("deeply nested JSON", "<tool_call>" + DEEP + "</tool_call>", "not valid JSON"),
    ("nested lists", _hermes(NESTED), "four numbers"),
    ("3 values", _hermes({"bbox_2d": [0, 0, 9]}), "four numbers"),
    ("5 values", _hermes({"bbox_2d": [0, 0, 9, 9, 9]}), "four numbers"),
    ("string values", _hermes({"bbox_2d": ["0", "0", "9", "9"]}), "four numbers"),
    ("a number label is dropped", _hermes({"bbox_2d": [0, 0, 9, 9], "label": 7}), Turn(call=Call((0, 0, 9, 9)))),
]
QWEN3VL_TEXTS = [
    ("img_idx", _hermes({"bbox_2d": [0, 0, 9, 9], "img_idx": 2}), Turn(call=Call((0, 0, 9, 9), None, 2))),
    ("img_idx null", _hermes({"bbox_2d": [0, 0, 9, 9], "img_idx": None}), Turn(call=Call((0, 0, 9, 9)))),
    ("img_idx a string", _hermes({"bbox_2d": [0, 0, 9, 9], "img_idx": "1"}), "img_idx must be an integer"),
    ("img_idx negative", _hermes({"bbox_2d": [0, 0, 9, 9], "img_idx": -1}), "img_idx must be an integer >= 0"),
    ("img_idx 1.0", _hermes({"bbox_2d": [0, 0, 9, 9], "img_idx": 1.0}), "img_idx must be an integer"),
]


def _grounding(obj):
    return "<grounding>" + (obj if isinstance(obj, str) else json.dumps(obj)) + "</grounding>"


G = _grounding({"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "original_image"})
G2 = _grounding({"bbox_2d": [0.5, 0.5, 0.6, 0.6], "source": "observation_2"})
MINIO3_TEXTS = [
    ("plain", "<think>look</think>" + G, Turn(call=Call((0.1, 0.2, 0.3, 0.4)))),
    ("observation_2", G2, Turn(call=Call((0.5, 0.5, 0.6, 0.6), None, 2))),
    ("observation_0 is the original", G2.replace("observation_2", "observation_0"), Turn(call=Call((.5, .5, .6, .6)))),
    ("missing closing tag at the end", G.removesuffix("</grounding>"), Turn(call=Call((0.1, 0.2, 0.3, 0.4)))),
    ("two groundings: the last", G + G2, Turn(call=Call((0.5, 0.5, 0.6, 0.6), None, 2))),
    ("answer before", "<answer>C</answer>" + G, Turn(answer="C")),
    ("answer after", G + "<answer>C</answer>", Turn(answer="C")),
    ("neither", "no idea", Turn()),
    ("a Hermes call is not Mini-o3's", CALL, Turn()),
    ("empty", "<grounding></grounding>", "empty"),
    ("bad source", G.replace("original_image", "observation_x"), "source must be"),
    ("source missing", _grounding({"bbox_2d": [0, 0, 1, 1]}), "source must be"),
    ("source a number", _grounding({"bbox_2d": [0, 0, 1, 1], "source": 1}), "source must be"),
    ("bbox missing", _grounding({"source": "original_image"}), "the grounding must be"),
    ("bbox a string", _grounding({"bbox_2d": "[0, 0, 1, 1]", "source": "original_image"}), "four numbers"),
    ("single quotes", "<grounding>{'bbox_2d': [0, 0, 1, 1], 'source': 'original_image'}</grounding>", "not valid"),
    ("a list", "<grounding>[0, 0, 1, 1]</grounding>", "the grounding must be"),
    ("a 400-digit number", _grounding({"bbox_2d": [0, 0, BIG, 1], "source": "original_image"}), "finite"),
    ("deeply nested", "<grounding>" + "[" * 100_000 + "</grounding>", "not valid JSON"),
    ("3 values", _grounding({"bbox_2d": [0, 0, 1], "source": "original_image"}), "four numbers"),
]


def _crop_call(args, name="crop_image_normalized"):
    return _hermes(args, name)


P = _crop_call({"bbox_2d": [0.1, 0.2, 0.3, 0.4], "target_image": 1})
P2 = _crop_call({"bbox_2d": [0.5, 0.5, 0.6, 0.6], "target_image": 3})
PIXELREASONER_TEXTS = [
    ("plain", "Let me look. " + P, Turn(call=Call((0.1, 0.2, 0.3, 0.4)))),
    ("target_image 3 is source 2", P2, Turn(call=Call((0.5, 0.5, 0.6, 0.6), None, 2))),
    ("missing closing tag at the end", P.removesuffix("\n</tool_call>"), Turn(call=Call((0.1, 0.2, 0.3, 0.4)))),
    ("a call then prose: no call", P + " Hmm.", Turn()),
    ("im_end after the call", P + "<|im_end|>\n", Turn(call=Call((0.1, 0.2, 0.3, 0.4)))),
    ("two calls: the last", P + P2, Turn(call=Call((0.5, 0.5, 0.6, 0.6), None, 2))),
    ("answer before a final call: the call runs", "\\boxed{A} " + P, Turn(call=Call((0.1, 0.2, 0.3, 0.4)))),
    ("answer after a call", P + " So \\boxed{B}.", Turn(answer="B")),
    ("nested braces", "so \\boxed{\\frac{1}{2}} done", Turn(answer="\\frac{1}{2}")),
    ("the last boxed", "\\boxed{1} then \\boxed{ {2} }", Turn(answer="{2}")),
    ("unbalanced boxed", "\\boxed{1} then \\boxed{2", Turn(answer="1")),
    ("answer tags are not Pixel-Reasoner's", "<answer>C</answer>", Turn()),
    ("empty call", "<tool_call></tool_call>", "empty"),
    ("wrong tool name", _crop_call({"bbox_2d": [0, 0, 1, 1], "target_image": 1}, "image_zoom_in_tool"),
     "unknown tool 'image_zoom_in_tool'"),
    ("arguments as a string", _crop_call('{"bbox_2d": [0, 0, 1, 1]}'), "arguments must be a JSON object"),
    ("target_image missing", _crop_call({"bbox_2d": [0, 0, 1, 1]}), "need target_image"),
    ("target_image 0", _crop_call({"bbox_2d": [0, 0, 1, 1], "target_image": 0}), "must be an integer >= 1"),
    ("target_image 1.0", _crop_call({"bbox_2d": [0, 0, 1, 1], "target_image": 1.0}), "target_image must be"),
    ("unparsable JSON", "<tool_call>{bad}</tool_call>", "not valid JSON"),
    ("a 400-digit number", _crop_call({"bbox_2d": [0, 0, BIG, 1], "target_image": 1}), "finite"),
    ("deeply nested JSON", "<tool_call>" + DEEP.replace("image_zoom_in_tool", "crop_image_normalized"), "not valid"),
    ("5 values", _crop_call({"bbox_2d": [0, 0, 1, 1, 1], "target_image": 1}), "four numbers"),
]

TEXTS = ([("deepeyes", *t) for t in HERMES_TEXTS] + [("qwen3vl", *t) for t in HERMES_TEXTS + QWEN3VL_TEXTS]
         + [("minio3", *t) for t in MINIO3_TEXTS] + [("pixelreasoner", *t) for t in PIXELREASONER_TEXTS])


@pytest.mark.parametrize("dialect, what, text, expected", TEXTS, ids=[f"{t[0]}: {t[1]}" for t in TEXTS])
def test_parse(dialect, what, text, expected):
    turn = get_dialect(dialect).parse(text)
    if isinstance(expected, str):
        assert turn.answer is None and turn.call is None and expected in turn.error, turn
        assert "\n" not in turn.error and len(turn.error) < 200
    else:
        assert turn == expected


def test_parse_refuses_only_non_strings():
    with pytest.raises(TypeError, match="str"):
        DeepEyesDialect().parse(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most one"):
        Turn(answer="A", call=Call((0, 0, 1, 1)))


@pytest.mark.parametrize("name", list(DIALECTS))
@SETTINGS
@given(bbox=st.lists(st.floats(0, 1000, allow_nan=False), min_size=4, max_size=4), source=st.integers(0, 5),
       label=st.none() | st.text(max_size=10))
def test_format_call_parses_back(name, bbox, source, label):
    d = get_dialect(name)
    source = 0 if name == "deepeyes" else source
    label = label if name in ("deepeyes", "qwen3vl") else None
    text = d.format_call(bbox, label=label, source=source)
    assert d.parse("<think>zoom</think>\n" + text) == Turn(call=Call(tuple(bbox), label, source))


garbage_text = st.lists(st.sampled_from(["<tool_call>", "</tool_call>", "<grounding>", "</grounding>", "<answer>",
                                         "</answer>", "\\boxed{", "{", "}", '"bbox_2d": ', '"name": ', "[", "]", ",",
                                         "1e999", "0.5", "-3", "NaN", '"source": "observation_1"', " ", "x"]),
                        max_size=40).map("".join)


@pytest.mark.parametrize("name", list(DIALECTS))
@SETTINGS
@given(text=garbage_text | st.text(max_size=60))
def test_parse_never_raises_on_garbage(name, text):
    turn = get_dialect(name).parse(text)
    assert isinstance(turn, Turn) and sum(v is not None for v in (turn.answer, turn.call, turn.error)) <= 1
    assert turn.error is None or ("\n" not in turn.error and turn.error)
