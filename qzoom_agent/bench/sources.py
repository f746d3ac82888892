"""Where `compare` gets its questions: ZoomWorld's held-out split or a real benchmark read by an adapter.

Both give the runner the same thing, a :class:`Question`: an index, a lazily decoded image, the prompt, the record
fields that describe it, and a scorer. Question indices of a run are ``random.Random(seed).sample(range(size), n)``
for both, so a seed names the same questions everywhere and a larger ``n`` extends the list; with ``n`` equal to the
source's size a real benchmark runs every question.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .. import scoring, zoomworld

if TYPE_CHECKING:
    from PIL import Image

    from .tasks.base import BenchItem, Task

ZOOMWORLD = "zoomworld"
TEST_SPLIT = "test"
WARMUP_SPLIT, WARMUP_INDEX = "val", 0


@dataclass(frozen=True)
class Question:
    """One question as the runner sees it.

    Attributes:
        index: the question's index in its source (what results.jsonl keys on).
        load_image: decodes the image (RGB).
        question: the prompt given to every agent.
        fields: record fields describing the question (truth, options, kind, family, target box, ...).
        score: ``score(answer) -> float`` in [0, 1], the source's own rule.
        target_box: the ground-truth box in source pixels, for reference agents that use it, else None.
    """

    index: int
    load_image: Callable[[], Image.Image]
    question: str
    fields: dict[str, Any]
    score: Callable[[str], float]
    target_box: tuple[float, float, float, float] | None = None


class QuestionSource(Protocol):
    """A benchmark the runner can draw questions from."""

    bench: str  # the --bench text
    preset: str | None  # the presets.py task of Q-Zoom's settings here (None: the model's own settings)
    max_new_tokens: int | None  # the source's generation budget (None: the runner's default)

    def size(self) -> int:
        """Number of questions available."""
        ...

    def get(self, index: int) -> Question:
        """Question ``index`` (0 <= index < size())."""
        ...

    def warmup(self) -> Question:
        """An unrecorded question to warm agents up with."""
        ...

    def identity(self) -> dict[str, Any]:
        """What besides the arguments fixes this source's questions (written to run.json)."""
        ...


def zoomworld_size() -> int:
    """Number of questions in ZoomWorld's TEST split (either variant)."""
    start, stop = zoomworld.SPLITS[TEST_SPLIT]
    return stop - start


def question_indices(size: int, seed: int, n: int) -> list[int]:
    """The ``n`` question indices of ``seed`` among ``size``: ``random.Random(seed).sample(range(size), n)``."""
    return random.Random(seed).sample(range(size), n)


class ZoomWorldSource:
    """ZoomWorld's TEST split of one variant, with questions in ``alphabet``."""

    preset = None
    max_new_tokens = None

    def __init__(self, bench: str, alphabet: str) -> None:
        self.bench = bench
        self.variant = bench.partition(":")[2]
        self.alphabet = alphabet

    def size(self) -> int:
        return zoomworld_size()

    def _question(self, s: zoomworld.ZoomWorldSample) -> Question:
        target = tuple(s.target_box) if s.target_box is not None else None
        fields = {"seed": s.seed, "split": s.split, "variant": s.variant, "family": s.family, "kind": s.kind,
                  "truth": s.answer, "options": s.options, "target_box": list(target) if target else None}
        return Question(s.index, lambda: s.image, s.question, fields,
                        lambda answer: float(scoring.is_correct(answer, s.answer, s.options)), target)

    def get(self, index: int) -> Question:
        return self._question(zoomworld.sample(self.variant, TEST_SPLIT, index, alphabet=self.alphabet))

    def warmup(self) -> Question:
        return self._question(zoomworld.sample(self.variant, WARMUP_SPLIT, WARMUP_INDEX, alphabet=self.alphabet))

    def identity(self) -> dict[str, Any]:
        return {"split": TEST_SPLIT, "generator_version": zoomworld.GENERATOR_VERSION}


class TaskSource:
    """A real benchmark task read by an adapter (:mod:`qzoom_agent.bench.tasks`)."""

    def __init__(self, bench: str, task: Task) -> None:
        self.bench = bench
        self.task = task
        self.preset = task.preset
        self.max_new_tokens = task.max_new_tokens

    def size(self) -> int:
        return len(self.task.items)

    def _question(self, item: BenchItem) -> Question:
        fields = {**item.record(), "family": item.category, "kind": None, "truth": item.answers[0] if item.answers
                  else "", "options": list(item.options) or None}
        score = self.task.score
        return Question(item.index, item.load_image, item.question, fields,
                        lambda answer: float(score(answer, item)), item.box)

    def get(self, index: int) -> Question:
        return self._question(self.task.items[index])

    def warmup(self) -> Question:
        return self.get(0)

    def identity(self) -> dict[str, Any]:
        return {"task": self.task.name, "source": self.task.source, "size": self.size(),
                "full_size": self.task.full_size}


def is_zoomworld(bench: str) -> bool:
    """Whether ``bench`` names ZoomWorld (``zoomworld:VARIANT``) rather than a real benchmark."""
    return bench.partition(":")[0] == ZOOMWORLD


def check_bench(text: str) -> str:
    """Check the form of a --bench value without reading any data: ``zoomworld:VARIANT`` or ``TASK:SOURCE``.

    Raises:
        ValueError: an unknown ZoomWorld variant or task name, or a task without a source, naming the valid ones.
    """
    name, sep, rest = text.partition(":")
    if name == ZOOMWORLD:
        valid = [f"zoomworld:{v}" for v in zoomworld.VARIANTS]
        if text not in valid:
            raise ValueError(f"unknown bench {text!r}; choose one of {', '.join(valid)}")
        return text
    from .tasks import TASK_NAMES

    if name not in TASK_NAMES:
        raise ValueError(f"unknown bench {text!r}; choose zoomworld:hr, zoomworld:doc or TASK:PATH with TASK one of "
                         f"{', '.join(TASK_NAMES)}")
    if not sep or not rest.strip():
        raise ValueError(f"--bench {text!r} needs a source: {name}:PATH (a local folder or file) or {name}:HUB_ID")
    return text


def open_source(bench: str, alphabet: str) -> QuestionSource:
    """The question source of a checked --bench value (a real benchmark is read here; images stay on disk).

    Raises:
        ValueError (`tasks.base.BenchDataError`): the benchmark cannot be read, or images it lists are missing.
    """
    if is_zoomworld(bench):
        return ZoomWorldSource(bench, alphabet)
    from .tasks import load_task
    from .tasks.base import BenchDataError

    task = load_task(bench)
    if task.missing:
        shown = ", ".join(task.missing[:5]) + (f" and {len(task.missing) - 5} more" if len(task.missing) > 5 else "")
        where = f" ({task.name}:QUESTIONS.jsonl@IMAGE_DIR)" if task.name == "vstar" else ""
        raise BenchDataError(f"{bench}: {len(task.missing)} of {len(task.items)} images are missing ({shown}); "
                             f"point the source at the folder that holds them{where}")
    if not task.items:
        raise BenchDataError(f"{bench}: no questions read from {task.source}")
    return TaskSource(bench, task)
