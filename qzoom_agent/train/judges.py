"""Answer judges for hard-sample mining: is a prediction right for a question?

``make_judge(spec)``: ``"exact"`` (identical after stripping whitespace), ``"normalized"`` (the benchmark's own
rule, `scoring.is_correct`: normalised match, option letters for multiple choice) or ``"llm:DIR"`` (any
local chat model with a chat template, asked for a yes/no verdict; loaded from ``DIR``, never downloaded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..scoring import is_correct


class Judge(Protocol):
    """Decides whether ``prediction`` answers ``question`` as ``reference`` does."""

    def __call__(self, question: str, prediction: str, reference: str,
                 options: Sequence[str] | None = None) -> bool: ...


def exact_judge(question: str, prediction: str, reference: str, options: Sequence[str] | None = None) -> bool:
    """Identical strings after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()


def normalized_judge(question: str, prediction: str, reference: str, options: Sequence[str] | None = None) -> bool:
    """The benchmark's scoring rule (`scoring.is_correct`)."""
    return is_correct(prediction, reference, options)


class LLMJudge:
    """A local chat model asked whether the prediction matches the reference; "yes" at the start counts as right.

    Args:
        path: a local model directory (``AutoModelForCausalLM`` with a chat template).
    """

    PROMPT = ("Question: {question}\nReference answer: {reference}\nCandidate answer: {prediction}\n"
              "Does the candidate answer mean the same as the reference answer? Reply with yes or no.")

    def __init__(self, path: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()

    def __call__(self, question: str, prediction: str, reference: str,
                 options: Sequence[str] | None = None) -> bool:
        import torch

        if normalized_judge(question, prediction, reference, options):
            return True  # a match needs no model
        text = self.PROMPT.format(question=question, reference=reference, prediction=prediction)
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=3, do_sample=False)
        reply = self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        return reply.strip().lower().startswith("yes")


def make_judge(spec: str) -> Judge:
    """The judge named by ``spec``.

    Raises:
        ValueError: an unknown spec (the message lists the valid ones).
    """
    if spec == "exact":
        return exact_judge
    if spec == "normalized":
        return normalized_judge
    if spec.startswith("llm:") and len(spec) > 4:
        return LLMJudge(spec[4:])
    raise ValueError(f"unknown judge {spec!r}; use 'exact', 'normalized' or 'llm:MODEL_DIR'")
