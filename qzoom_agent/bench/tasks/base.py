"""What every benchmark adapter provides: items (image, prompt, references) and the benchmark's own scorer.

An adapter reads one benchmark from a local folder in the layout its authors publish (or a hub id, through
``datasets``) into a :class:`Task`. Images are decoded only when an agent needs them, so a 5,000-question task
opens in seconds and a missing image is reported before any model runs (:attr:`Task.missing`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image


class BenchDataError(ValueError):
    """A benchmark folder or file that cannot be read as that benchmark; the message says what to fix."""


@dataclass(frozen=True)
class BenchItem:
    """One benchmark question.

    Attributes:
        index: position in the task's stable order (0..len-1); the runner's question index.
        qid: the benchmark's own question id (as a string).
        task: the task name, e.g. ``"vstar"``, ``"hrbench8k"``, ``"docvqa"``.
        category: the benchmark's category or subtask (``"direct_attributes"``, ``"FSP"``, ``"human_test"``...).
        question: the prompt given to the model: the question, its options and the benchmark's instruction, exactly
            as the reference evaluation (lmms-eval) builds it.
        answers: reference answers (the option letter for multiple choice; all annotators' answers for TextVQA).
        options: option texts of a multiple-choice question, in letter order; empty otherwise.
        box: the ground-truth box ``(x1, y1, x2, y2)`` in source pixels, when the benchmark publishes one.
        image_name: a readable name of the image (its file name or id), for error messages and records.
        load_image: decodes the image (RGB); called once per agent run. None only in scorer tests.
    """

    index: int
    qid: str
    task: str
    category: str
    question: str
    answers: tuple[str, ...]
    options: tuple[str, ...] = ()
    box: tuple[float, float, float, float] | None = None
    image_name: str = ""
    load_image: Callable[[], Image.Image] | None = field(default=None, compare=False, repr=False)

    def record(self) -> dict[str, Any]:
        """The JSON fields a result record keeps about this item."""
        return {"qid": self.qid, "task": self.task, "category": self.category, "question": self.question,
                "answers": list(self.answers), "options": list(self.options),
                "target_box": list(self.box) if self.box is not None else None, "image": self.image_name}


Scorer = Callable[[str, BenchItem], float]
"""``score(prediction, item) -> float`` in [0, 1]: the benchmark's own rule (1.0 right, 0.0 wrong; ANLS and the
VQA accuracy are fractional)."""


@dataclass(frozen=True)
class Task:
    """One benchmark task, ready to run.

    Attributes:
        name: task name (``vstar``, ``hrbench4k``, ``hrbench8k``, ``mme-realworld-lite``, ``textvqa``, ``docvqa``,
            ``infovqa``, ``chartqa``, ``ocrbench``).
        items: the questions, in a stable order (``items[i].index == i``).
        score: the benchmark's scorer.
        preset: the :mod:`qzoom_agent.presets` task whose thresholds and budgets Q-Zoom uses here.
        full_size: questions in the full official split; weights the task in the size-weighted harmonic mean of
            throughput (the paper's protocol), even when fewer are run.
        max_new_tokens: the reference evaluation's generation budget.
        source: where the items were read from (folder, file or hub id).
        missing: names of images the source lists but does not hold (checked at load, nothing decoded); the runner
            refuses to start while any are missing, naming them.
    """

    name: str
    items: Sequence[BenchItem]
    score: Scorer
    preset: str
    full_size: int
    max_new_tokens: int
    source: str
    missing: tuple[str, ...] = ()
