"""question_stem: the RoI query without answer options."""

from __future__ import annotations

import pytest

from qzoom_agent.query import question_stem

STEM = "What is written on the red tag?"


@pytest.mark.parametrize("options", [
    "\n(A) 35\n(B) 49\n(C) 39\n(D) 89\nAnswer with the option's letter.",  # ZoomWorld's and V*'s layout
    "\nA. 35\nB. 49",
    "\nA) 35\nB) 49\nC) 39",
    "\n a: 35\n b: 49",
    "\n1. 35\n2. 49",
    "\n(1) 35\n(2) 49",
    " (A) 35 (B) 49 (C) 39",  # inline
    "\n(A) 35 (B) 49",
])
def test_options_are_cut(options):
    assert question_stem(STEM + options) == STEM


def test_a_stem_over_several_lines_is_kept_whole():
    question = "Look at the photo.\n" + STEM + "\n(A) 35\n(B) 49"
    assert question_stem(question) == "Look at the photo.\n" + STEM


@pytest.mark.parametrize("question", [
    STEM,  # no options
    "A. Lincoln is on the poster.\n" + STEM,  # one line that looks like an option is not a block of them
    STEM + "\n(B) 35\n(C) 49",  # a block that does not start at A, a or 1
    "(A) 35\n(B) 49",  # nothing before the options: the whole text is the query
    "(A) 35 (B) 49",
    "",
])
def test_questions_without_an_option_block_are_unchanged(question):
    assert question_stem(question) == question
