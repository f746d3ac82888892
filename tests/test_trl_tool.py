"""The zoom tools as TRL tools: the environment class on its own, and a real `trl.GRPOTrainer` step on a tiny
Qwen3-VL in which the policy calls ``zoom`` and the crop reaches the training forward."""

from __future__ import annotations

import copy
import inspect
import os
import time

import pytest
import torch
from PIL import Image
from qzoom_agent.rl.processor import no_video_processor, tensor_image_processor
from qzoom_agent.tools.trl_env import (
    CropEnvironment,
    ZoomEnvironment,
    freeze_perception,
    row_image,
    row_question,
    zoom_environment,
)
from tiny_models import QUESTION, make_image, make_model
from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor
from transformers.utils import get_json_schema

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

CALL = '<tool_call>\n{"name": "zoom", "arguments": {}}\n</tool_call>'


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qm():
    return make_model("qwen3_vl")


def _tools(env_cls: type) -> list[str]:
    """The tool names TRL takes from an environment class: its public functions but reset and get_reward."""
    return sorted(n for n, _ in inspect.getmembers(env_cls, predicate=inspect.isfunction)
                  if not n.startswith("_") and n not in ("reset", "get_reward"))


# ---- the environment on its own ------------------------------------------------------------------------------------
def test_zoom_environment_reset_zoom_and_counters(qm):
    env_cls = zoom_environment(qm)
    assert issubclass(env_cls, ZoomEnvironment) and _tools(env_cls) == ["zoom"]
    schema = get_json_schema(env_cls().zoom)["function"]
    assert schema["name"] == "zoom" and set(schema["parameters"]["properties"]) == {"hint"}
    assert "Args:" not in schema["description"] and "prefill" not in schema["description"]  # policy-facing only

    env, image = env_cls(), make_image()
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert env.reset(prompt=prompt, images=[image], answer="A7", target_box=[1, 2, 3, 4]) is None
    assert env.question == QUESTION and env.image.size == image.size and env.answer == "A7"

    blocks = env.zoom()
    assert [b["type"] for b in blocks] == ["image", "text"] and isinstance(blocks[0]["image"], Image.Image)
    assert blocks[1]["text"].startswith("Zoomed in on [")
    box = env.boxes[0]
    assert box is not None and 0 <= box[0] < box[2] <= image.width and 0 <= box[1] < box[3] <= image.height
    assert env.outputs[0].artifact["source"] == "fresh"

    hinted = env.zoom(hint="the green tag")
    assert hinted[-1]["type"] == "text" and env.outputs[1].artifact["hint"] == "the green tag"
    bad = env.zoom(hint=5)  # the policy writes any JSON: a number is an error line, not an exception
    assert bad == [{"type": "text", "text": "hint must be a string, got 5"}]
    assert (env.calls, env.failed_calls, env.boxes[2]) == (3, 1, None)
    assert qm.adapter.model.training is False

    env.reset(image=image, question=QUESTION)  # counters start again for the next rollout
    assert (env.calls, env.failed_calls, env.boxes, env.outputs) == (0, 0, [], [])


def test_zoom_view_tokens_cap_the_returned_view_and_eval_mode_is_restored(qm):
    env = zoom_environment(qm, view_tokens=16)()
    env.reset(image=make_image(), question=QUESTION)
    qm.adapter.model.train()
    try:
        view = env.zoom()[0]["image"]
        assert qm.adapter.model.training is True  # the perception ran in eval mode and gave the mode back
    finally:
        qm.adapter.model.eval()
    px = qm.adapter.px_per_token
    assert view.width * view.height <= 16 * px * px * 1.05
    assert env.outputs[0].artifact["view_size"] == list(view.size)


def test_zoom_without_a_box_or_an_image_is_an_error_line(qm):
    env = zoom_environment(qm)()
    env.reset(image=make_image(), question=QUESTION)
    old = qm.config.roi_threshold
    qm.config.roi_threshold = 0.99  # no blurred RoI probability of a random twig reaches it: no region
    try:
        blocks = env.zoom()
    finally:
        qm.config.roi_threshold = old
    assert len(blocks) == 1 and blocks[0]["text"].startswith("No region stood out for the question")
    assert (env.failed_calls, env.boxes) == (1, [None])

    env.reset(prompt=[{"role": "user", "content": "no image here"}])
    assert env.zoom() == [{"type": "text", "text": "zoom needs an image: this example has no image to zoom into"}]
    env.reset(image=b"not an image", question="q")
    assert env.row_error.startswith("the image of this example could not be loaded")
    assert env.zoom()[0]["text"].startswith("zoom needs an image: the image of this example could not be loaded")


def test_crop_environment_tool_schema_and_bad_bbox(qm):
    env_cls = zoom_environment(qm, crop=True, frame="norm1")
    assert issubclass(env_cls, CropEnvironment) and _tools(env_cls) == ["image_zoom_in_tool"]
    schema = get_json_schema(env_cls().image_zoom_in_tool)["function"]
    assert schema["parameters"]["required"] == ["bbox_2d"]
    assert "from 0 to 1 across" in schema["parameters"]["properties"]["bbox_2d"]["description"]

    env, image = env_cls(), make_image(400, 300)
    env.reset(image=image, question=QUESTION)
    good = env.image_zoom_in_tool([0.25, 0.5, 0.75, 1.0], label="tag")
    assert [b["type"] for b in good] == ["image", "text"] and env.boxes == [[100, 150, 300, 300]]
    assert good[0]["image"].size == (200, 150)
    for bad in ([0.5, 0.5, 0.1, 0.1], "0,0,1,1", [0, 0, 1], [float("nan"), 0, 1, 1]):
        blocks = env.image_zoom_in_tool(bad)
        assert len(blocks) == 1 and blocks[0]["type"] == "text" and blocks[0]["text"]
    assert (env.calls, env.failed_calls) == (5, 4) and env.boxes[1:] == [None] * 4

    absolute = zoom_environment(qm, crop=True, frame="absolute", view_size_of=lambda im: (im.width // 2,
                                                                                          im.height // 2))()
    assert _tools(type(absolute)) == ["image_zoom_in_tool"]  # the callable setting is no tool
    absolute.reset(image=image, question=QUESTION)
    absolute.image_zoom_in_tool([50, 75, 150, 150])  # pixels of the 200x150 view the policy saw
    assert absolute.boxes == [[100, 150, 300, 300]]


def test_rows_and_bad_settings(qm):
    image = make_image(64, 48)
    assert row_image({"images": [image, make_image()]}).size == (64, 48)
    assert row_image({"question": "q"}) is None
    assert row_question({"prompt": [{"role": "system", "content": "s"},
                                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "image"}, {"type": "text", "text": "b"}]}]
                         }) == "a b"
    assert row_question({"prompt": "plain", "question": " "}) == "plain"
    with pytest.raises(ValueError, match="frame"):
        zoom_environment(qm, crop=True, frame="pixels")
    with pytest.raises(ValueError, match="view_tokens"):
        zoom_environment(qm, view_tokens=0)


# ---- a real GRPOTrainer step ---------------------------------------------------------------------------------------
# the recipe's processor classes (rl/processor.py): no video processor (it needs torchvision), and torch tensors
# from the image processor (TRL 1.16 crashes on a tool turn in which no rollout got an image back otherwise)
NoVideoQwen3VLProcessor = no_video_processor(Qwen3VLProcessor)
TensorImageProcessor = tensor_image_processor(Qwen2VLImageProcessorPil)


def _processor(qm, max_tokens: int) -> Qwen3VLProcessor:
    from trl.chat_template_utils import qwen3_vl_chat_template

    vc = qm.adapter.model.config.vision_config
    f = vc.patch_size * vc.spatial_merge_size
    ip = TensorImageProcessor(size={"shortest_edge": 4 * f * f, "longest_edge": max_tokens * f * f},
                              patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                              merge_size=vc.spatial_merge_size)
    tok = copy.deepcopy(qm.adapter.tokenizer)  # TRL sets a response template on it; the model's stays as it was
    return NoVideoQwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=None,
                                   chat_template=qwen3_vl_chat_template)


def _overfit_tool_call(hf, proc, prompt: list[dict], image: Image.Image, tools: list, *, steps: int = 400
                       ) -> tuple[int, float]:
    """Teach the random ``hf`` to answer ``prompt`` with the zoom call, so that the GRPO step below exercises
    the tool loop deterministically (the stack doc's trick, made cheap): the last decoder layer, the final norm
    and the LM head are fitted on that layer's input, computed once, until every token of the call has p > 0.98
    (sampling at temperature 0.2 then follows it). Returns (steps, the worst token's loss through the whole
    model)."""
    text = proc.apply_chat_template(prompt, tools=tools, tokenize=False, add_generation_prompt=True)
    enc = proc(text=[text + CALL + "<|im_end|>"], images=[image], return_tensors="pt")
    n_prompt = proc(text=[text], images=[image], return_tensors="pt")["input_ids"].shape[1]
    targets = enc["input_ids"][0, n_prompt:]
    lm = hf.model.language_model
    last, call = lm.layers[-1], {}

    def capture(module, args, kwargs):
        call.update(args=args, kwargs=kwargs)

    handle = last.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        hf(**enc, use_cache=False)
    handle.remove()
    opt = torch.optim.Adam([*last.parameters(), *lm.norm.parameters(), hf.lm_head.weight], lr=1e-2)
    for step in range(1, steps + 1):  # noqa: B007 (the count is returned)
        hidden = lm.norm(last(*call["args"], **call["kwargs"]))[0, n_prompt - 1:-1]  # the states predicting the call
        losses = torch.nn.functional.cross_entropy(hf.lm_head(hidden), targets, reduction="none")
        if float(losses.max()) < 0.01:
            break
        losses.mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        logits = hf(**enc, use_cache=False).logits[0, n_prompt - 1:-1]
        worst = float(torch.nn.functional.cross_entropy(logits, targets, reduction="none").max())
    return step, worst


def _grpo_step(hf, proc, env_cls: type, dataset, out_dir, *, max_completion_length: int, lr: float) -> dict:
    """One real `trl.GRPOTrainer` step; returns what it showed: the trainer, its merged logs, every forward of
    ``hf`` (grad enabled, number of images, their grids) and what the reward function saw of the environments."""
    import trl

    forwards, seen = [], {}

    def spy(module, args, kwargs):
        thw = kwargs.get("image_grid_thw")
        forwards.append((torch.is_grad_enabled(), 0 if thw is None else thw.shape[0],
                         [] if thw is None else [tuple(r) for r in thw.tolist()]))

    def zoom_reward(completions, environments, **kwargs):
        seen["calls"] = [e.calls for e in environments]
        seen["boxes"] = [e.boxes for e in environments]
        seen["failed"] = [e.failed_calls for e in environments]
        # a tie-break by position so the group's rewards differ and the step has a gradient
        return [float(e.calls > 0 and e.failed_calls == 0) - 0.1 * i for i, e in enumerate(environments)]

    # temperature 0.2: the overfit call (every token p > 0.98) is then sampled exactly
    args = trl.GRPOConfig(output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, beta=0.0,
                          per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=max_completion_length, max_steps=1, learning_rate=lr,
                          temperature=0.2, logging_steps=1, report_to="none", save_strategy="no",
                          max_tool_calling_iterations=1, seed=0, dataloader_num_workers=0)
    trainer = trl.GRPOTrainer(model=hf, reward_funcs=zoom_reward, args=args, train_dataset=dataset,
                              processing_class=proc, environment_factory=env_cls)
    handle = hf.register_forward_pre_hook(spy, with_kwargs=True)
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        handle.remove()
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    return {"trainer": trainer, "logs": logs, "forwards": forwards, "seen": seen, "s": time.perf_counter() - t0}


def test_grpo_step_calls_zoom_and_trains_on_the_crop(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")

    qm = make_model("qwen3_vl")  # its own: the policy's weights change
    hf = qm.adapter.model
    trainable = freeze_perception(qm)
    k = qm.config.twig_K
    assert trainable and not any(n.startswith(("model.visual.", "model.language_model.embed_tokens."))
                                 or any(n.startswith(f"model.language_model.layers.{i}.") for i in range(k))
                                 for n in trainable)
    proc = _processor(qm, max_tokens=64)
    env_cls = zoom_environment(qm, view_tokens=16)
    image = make_image()
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]

    t0 = time.perf_counter()
    steps, loss = _overfit_tool_call(hf, proc, prompt, image, [env_cls().zoom])
    overfit_s = time.perf_counter() - t0
    assert loss < 0.02, f"the tiny policy did not learn the tool call ({steps} steps, worst token loss {loss:.3f})"
    perceived = env_cls()  # the perception before training, for comparison
    perceived.reset(image=image, question=QUESTION)
    perceived.zoom()
    assert perceived.failed_calls == 0

    def grid(im: Image.Image) -> tuple[int, ...]:
        return tuple(proc.image_processor(images=[im], return_tensors="pt")["image_grid_thw"][0].tolist())

    row_grid, crop_grid = grid(image), grid(perceived.outputs[0].image)
    assert row_grid != crop_grid
    dataset = datasets.Dataset.from_list([{"prompt": prompt, "image": image, "question": QUESTION,
                                           "target_box": [0, 0, 100, 100]}] * 2)

    # too small a completion budget: the tool runs, but TRL drops its result (crop tokens and all) unannounced;
    # learning rate 0, so the policy is unchanged for the real step below
    short = _grpo_step(hf, proc, env_cls, dataset, tmp_path / "short", max_completion_length=64, lr=0.0)
    assert short["seen"]["calls"] == [1, 1]
    assert [n for grad, n, _ in short["forwards"] if grad] == [2]  # the rows' images only

    # every zoom refused (no region): the error lines go back as text and the step still runs (see
    # TensorImageProcessor for the TRL crash this takes)
    threshold, qm.config.roi_threshold = qm.config.roi_threshold, 0.99
    try:
        refused = _grpo_step(hf, proc, env_cls, dataset, tmp_path / "refused", max_completion_length=192, lr=0.0)
    finally:
        qm.config.roi_threshold = threshold
    assert refused["seen"]["calls"] == [1, 1] and refused["seen"]["failed"] == [1, 1]
    assert [n for grad, n, _ in refused["forwards"] if grad] == [2]

    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    run = _grpo_step(hf, proc, env_cls, dataset, tmp_path / "run", max_completion_length=192, lr=1e-2)
    assert run["trainer"].model is hf  # the policy trained is the model that perceives
    # the zoom tool was called in both rollouts, seen through the environments the reward function was given
    assert run["seen"]["calls"] == [1, 1] and run["seen"]["failed"] == [0, 0], run["seen"]
    assert run["logs"]["tools/call_frequency"] > 0 and run["logs"]["tools/failure_frequency"] == 0
    # the crop reached the training forward: 2 images per sample (the row's, then the zoom's crop), grad on
    train = [(n, grids) for grad, n, grids in run["forwards"] if grad]
    assert train == [(4, [row_grid, crop_grid] * 2)], (row_grid, crop_grid, run["forwards"])
    # the step trained layers K.. and left what the heads read as it was: the perception did not move
    after = dict(hf.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in trainable)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)
    again = env_cls()
    again.reset(image=image, question=QUESTION)
    again.zoom()
    assert again.boxes == perceived.boxes and run["seen"]["boxes"] == [perceived.boxes] * 2
    print(f"overfit {steps} steps {overfit_s:.1f}s (worst token loss {loss:.4f}); GRPO steps {short['s']:.1f}s "
          f"(budget too short), {refused['s']:.1f}s (every zoom refused), {run['s']:.1f}s")


def test_arguments_the_signature_does_not_take_are_counted_error_lines(qm):
    """TRL calls a tool with whatever arguments the policy wrote; a TypeError would reach the policy as a Python
    message and bypass the rollout's counters, which the rewards read."""
    env = zoom_environment(qm)()
    env.reset(image=make_image(), question=QUESTION)
    assert env.zoom(bogus=1) == [{"type": "text", "text": "zoom: got an unexpected keyword argument 'bogus'"}]
    assert set(get_json_schema(env.zoom)["function"]["parameters"]["properties"]) == {"hint"}  # schema unchanged
    crop = zoom_environment(qm, crop=True)()
    crop.reset(image=make_image(), question=QUESTION)
    assert crop.image_zoom_in_tool()[0]["text"] == "image_zoom_in_tool: missing a required argument: 'bbox_2d'"
    assert (env.calls, env.failed_calls, crop.calls, crop.failed_calls) == (1, 1, 1, 1)
