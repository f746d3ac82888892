"""Every GRPO recipe (configs/grpo/*.yaml) parses into its settings and a `trl.GRPOConfig` whose batch, budget and
hardware settings hold together; the accelerate configs and the GPU install pins say what the recipes rely on.

No model is loaded and no GPU is needed: a GPU recipe is parsed with transformers' bf16-capability probe reporting
a capable GPU (TrainingArguments refuses ``bf16: true`` without ``use_cpu`` on a machine that has none), and
`check_accelerator` is asked about a machine without CUDA or vLLM.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from qzoom_agent.rl.config import ENVIRONMENTS, parse_recipe
from qzoom_agent.rl.gpu import GPU_INSTALL, AcceleratorError, check_accelerator
from qzoom_agent.rl.rewards import build_rewards

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "grpo").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
CONSTRAINTS = ROOT / "configs" / "gpu-constraints.txt"

# What each GPU recipe is meant to be; a new GPU recipe is checked by the generic rules and may be added here.
INTENDED = {
    "qwen2_5vl_7b_qzoom.yaml": {"environment": "zoom", "vllm_mode": "server", "chat_template": "qwen3_vl"},
    "qwen2_5vl_7b_crop.yaml": {"environment": "crop", "dialect": "deepeyes", "vllm_mode": "colocate",
                               "chat_template": "qwen3_vl"},
    "qwen3vl_4b_qzoom.yaml": {"environment": "zoom", "vllm_mode": "colocate", "chat_template": "model"},
}
CALL_TEXT = 64  # tokens a call turn and its reply's text take, at least, besides the returned image
PROMPT_ROOM = 1024  # tokens the prompt (an image of at most 576 visual tokens plus the text) takes, at most
CROP_DIALECTS = ("deepeyes", "qwen3vl", "pixelreasoner")  # the crop dialects TRL's Hermes parser reads


@pytest.fixture(scope="module")
def parsed() -> dict[str, tuple]:
    """name -> (RecipeArguments, GRPOConfig) for every recipe file, parsed once."""
    import transformers.training_args as training_args

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training_args, "is_torch_bf16_gpu_available", lambda: True)
        for path in RECIPES:
            out[path.name] = parse_recipe(["--config", str(path)])
    return out


def is_gpu(grpo) -> bool:
    return not grpo.use_cpu


def test_the_recipes_are_there():
    names = {p.name for p in RECIPES}
    assert set(INTENDED) <= names, f"missing GPU recipes: {set(INTENDED) - names}"
    assert "zoomworld_tiny_cpu.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_with_its_rewards(parsed, path):
    recipe, grpo = parsed[path.name]
    assert type(grpo).__name__ == "GRPOConfig"
    assert grpo.output_dir
    funcs, weights = build_rewards(recipe.rewards, num_generations=grpo.num_generations, curiosity=recipe.curiosity)
    assert sorted(f.__name__ for f in funcs) == sorted(recipe.rewards)
    assert dict(zip([f.__name__ for f in funcs], weights, strict=True)) == {k: float(v)
                                                                             for k, v in recipe.rewards.items()}
    assert recipe.rewards.get("accuracy", 0) > 0, "a recipe must reward the right answer"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_environment_and_dialect(parsed, path):
    recipe, _ = parsed[path.name]
    assert recipe.environment in ENVIRONMENTS
    if recipe.environment == "crop":
        assert recipe.dialect in CROP_DIALECTS
    if recipe.environment == "zoom":
        assert recipe.freeze_perception, "the internal zoom needs freeze_perception: true"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_generation_batch_holds_whole_groups(parsed, path):
    """TRL: generation_batch_size = per_device_train_batch_size x processes x steps_per_generation (which defaults
    to gradient_accumulation_steps) must be divisible by num_generations. Required per process, so it holds for
    any number of processes."""
    _, grpo = parsed[path.name]
    steps = grpo.gradient_accumulation_steps
    assert grpo.steps_per_generation == steps  # the recipes leave TRL's default
    per_process = grpo.per_device_train_batch_size * steps
    assert grpo.generation_batch_size == per_process  # TRL's own count, at the one process of this test
    assert grpo.num_generations >= 2
    assert per_process % grpo.num_generations == 0, (
        f"{per_process} rollouts per process per step do not split into groups of {grpo.num_generations}")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_completion_budget_holds_the_tool_images(parsed, path):
    """Tool turns (their images included) count towards max_completion_length: one returned view plus its call
    must fit in every recipe, and every allowed call in a GPU recipe."""
    recipe, grpo = parsed[path.name]
    if recipe.environment == "none":
        return
    assert grpo.max_completion_length >= recipe.view_tokens + CALL_TEXT
    if is_gpu(grpo):
        calls = grpo.max_tool_calling_iterations
        assert calls is not None and calls >= 1, "a GPU recipe caps the tool calls"
        need = calls * recipe.view_tokens + (calls + 1) * CALL_TEXT
        assert grpo.max_completion_length >= need, f"{calls} calls need {need} tokens"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_accelerator_check_on_a_machine_without_gpu(parsed, path):
    _, grpo = parsed[path.name]
    if not is_gpu(grpo):
        assert check_accelerator(grpo, cuda_available=False, vllm_installed=False) == "cpu"
        return
    with pytest.raises(AcceleratorError) as err:
        check_accelerator(grpo, cuda_available=False, vllm_installed=False)
    message = str(err.value)
    if grpo.use_vllm:
        assert "vllm" in message and "not installed" in message and GPU_INSTALL in message
        with pytest.raises(AcceleratorError, match="CUDA GPU"):
            check_accelerator(grpo, cuda_available=False, vllm_installed=True)
    else:
        assert "CUDA GPU" in message
    assert check_accelerator(grpo, cuda_available=True, vllm_installed=True) == "cuda"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_gpu_recipe_settings(parsed, path):
    recipe, grpo = parsed[path.name]
    intended = INTENDED.get(path.name)
    if not is_gpu(grpo):
        assert intended is None, f"{path.name} should be a GPU recipe"
        assert not grpo.bf16 and not grpo.use_vllm
        return
    assert grpo.bf16 and not grpo.fp16
    assert grpo.gradient_checkpointing
    assert grpo.use_vllm and grpo.vllm_mode in ("server", "colocate")
    assert recipe.model.startswith("models/"), "no hub at run time: the model is a local directory"
    if recipe.environment == "zoom":
        assert recipe.qzoom.startswith("models/"), "the internal zoom names its Q-Zoom heads directory"
    if re.search(r"qwen2\.?5[-_]?vl", recipe.model, re.IGNORECASE):
        assert recipe.chat_template == "qwen3_vl", "Qwen2.5-VL's stock template drops tool-turn images"
    if grpo.vllm_mode == "colocate":
        assert 0 < grpo.vllm_gpu_memory_utilization <= 0.5, "colocated vLLM must leave room for training"
        assert grpo.vllm_max_model_length is not None
        assert grpo.vllm_max_model_length >= grpo.max_completion_length + PROMPT_ROOM
    assert recipe.eval_n == 0, "in-training evaluation runs on rank 0 alone; GPU recipes evaluate afterwards"
    if intended is not None:
        for key in ("environment", "dialect", "chat_template"):
            if key in intended:
                assert getattr(recipe, key) == intended[key], key
        assert grpo.vllm_mode == intended["vllm_mode"]
        assert grpo.learning_rate == pytest.approx(1e-6)
        assert grpo.beta == 0.0
        assert grpo.temperature == 1.0
        assert grpo.num_generations == 8


def _launch_commands(path: Path) -> str:
    """The recipe's leading comment block, continuation lines joined."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines).replace("\\\n", " ")


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name in INTENDED], ids=lambda p: p.name)
def test_launch_commands_in_the_header(parsed, path):
    _, grpo = parsed[path.name]
    header = _launch_commands(path)
    assert "pip install -e \".[gpu]\" -c configs/gpu-constraints.txt" in header
    launches = [shlex.split(line[line.index("accelerate launch"):]) for line in header.splitlines()
                if "accelerate launch" in line]
    assert len(launches) == 1, header
    argv = launches[0]
    config = argv[argv.index("--config_file") + 1]
    assert (ROOT / config).is_file(), config
    stage = yaml.safe_load((ROOT / config).read_text())["deepspeed_config"]["zero_stage"]
    assert stage == 2, "the recipes need whole weights on every rank (see configs/accelerate/zero3.yaml)"
    assert argv[argv.index("-m") + 1:argv.index("-m") + 3] == ["qzoom_agent.cli", "grpo"]
    assert argv[argv.index("--config") + 1] == f"configs/grpo/{path.name}"
    if grpo.vllm_mode == "server":
        serve = [shlex.split(line) for line in header.splitlines() if "trl vllm-serve --model" in line]
        assert len(serve) == 1, header
        assert serve[0][0] == "CUDA_VISIBLE_DEVICES=0"
        assert serve[0][serve[0].index("--port") + 1] == str(grpo.vllm_server_port)
        train_env = next(line for line in header.splitlines() if "accelerate launch" in line).split()[0]
        visible = train_env.removeprefix("CUDA_VISIBLE_DEVICES=").split(",")
        assert "0" not in visible, "the server's GPU must not also train"
        assert argv[argv.index("--num_processes") + 1] == str(len(visible))


def test_python_m_cli_runs_main():
    """The launch commands run `python -m qzoom_agent.cli`."""
    source = (ROOT / "qzoom_agent" / "cli.py").read_text(encoding="utf-8")
    assert re.search(r'^if __name__ == "__main__":\n\s+sys\.exit\(main\(\)\)', source, re.MULTILINE)


def test_accelerate_configs():
    from accelerate.commands.config.config_args import ClusterConfig

    assert {p.name for p in ACCELERATE} >= {"zero2.yaml", "zero3.yaml"}
    for path in ACCELERATE:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        stage = int(re.fullmatch(r"zero(\d)\.yaml", path.name).group(1))
        assert cfg["distributed_type"] == "DEEPSPEED"
        assert cfg["deepspeed_config"]["zero_stage"] == stage
        assert cfg["mixed_precision"] == "bf16"
        assert (cfg["num_machines"], cfg["num_processes"]) == (1, 8)
        assert cfg["use_cpu"] is False
        assert cfg["deepspeed_config"]["zero3_init_flag"] is (stage == 3)
        loaded = ClusterConfig.from_yaml_file(str(path))  # raises on a key accelerate does not know
        assert loaded.deepspeed_config["zero_stage"] == stage


def _requirements(lines) -> dict[str, Requirement]:
    reqs = [Requirement(line.split("#", 1)[0].strip()) for line in lines if line.split("#", 1)[0].strip()]
    return {r.name.lower(): r for r in reqs}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _check_gpu_pins(reqs: dict[str, Requirement], where: str) -> None:
    def allows(name: str, version: str) -> bool:
        return reqs[name].specifier.contains(Version(version), prereleases=False)

    assert {"vllm", "torch", "transformers"} <= set(reqs), where
    assert allows("vllm", "0.34.0") and not allows("vllm", "0.33.1") and not allows("vllm", "0.35.0"), where
    assert allows("torch", "2.14.0") and not allows("torch", "2.13.0") and not allows("torch", "2.15.0"), where
    assert allows("transformers", "5.22.2"), where
    assert not allows("transformers", "5.23.0") and not allows("transformers", "5.19.0"), where


def test_gpu_extra_pins():
    extras = _project()["optional-dependencies"]
    _check_gpu_pins(_requirements(extras["gpu"]), "pyproject gpu extra")


def test_gpu_constraints_pin_and_agree():
    pins = _requirements(CONSTRAINTS.read_text(encoding="utf-8").splitlines())
    _check_gpu_pins(pins, CONSTRAINTS.name)
    exact = {name: str(r.specifier)[2:] for name, r in pins.items() if str(r.specifier).startswith("==")}
    assert exact["vllm"] == "0.34.0" and exact["torch"] == "2.14.0" and exact["trl"] == "1.16.0"
    # every exact pin satisfies the gpu extra and the project's own dependencies
    project = _project()
    for source in (project["optional-dependencies"]["gpu"], project["dependencies"]):
        for name, req in _requirements(source).items():
            if name in exact:
                assert req.specifier.contains(Version(exact[name])), f"{name}=={exact[name]} vs {req}"


def test_cpu_install_untouched_by_the_gpu_pins():
    """`make venv` installs torch 2.13 and then ".[dev]": neither may pull the GPU pins."""
    project = _project()
    base = _requirements(project["dependencies"])
    assert base["torch"].specifier.contains(Version("2.13.0"))
    assert base["transformers"].specifier.contains(Version("5.23.0"))
    dev = _requirements(project["optional-dependencies"]["dev"])
    assert not {"vllm", "torch", "deepspeed"} & set(dev)
    assert re.search(r"^TORCH \?= torch==2\.13\.0$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE)
