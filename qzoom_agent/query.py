"""The RoI query: the text the twig scores the image for.

The paper's twig reads the last prompt token. In a multiple-choice prompt that token sits after the answer options
and an instruction ("Answer with the option's letter."), far from the words that say where to look; on the bundled
model the box then finds the asked tag less often than for the same question without options. The *stem* of a
question is the part before its options: that is what says where to look.
"""

from __future__ import annotations

import re

# An option line: "(A) ...", "A. ...", "A) ...", "A: ..." (letters or one- or two-digit numbers).
_OPTION_LINE = re.compile(r"^\s*(?:\((?P<p>[A-Za-z]|\d{1,2})\)|(?P<b>[A-Za-z]|\d{1,2})[.):])\s*\S")
# Options written inline: " (A) red (B) blue".
_INLINE_OPTIONS = re.compile(r"\s\(A\)\s*\S.*\s\(B\)\s*\S", re.DOTALL)
_FIRST_LABELS = {"A", "a", "1"}


def question_stem(question: str) -> str:
    """The question without its answer options (and whatever follows them).

    Options are either lines, at least two, the first labelled ``A``, ``a`` or ``1`` (``(A) red``, ``A. red``,
    ``A) red``, ``A: red``), or inline ``(A) ... (B) ...``. A question without options, or with nothing before them,
    is returned unchanged.

    Examples:
        >>> question_stem("What is written on the red tag?\\n(A) 35\\n(B) 49\\nAnswer with the option's letter.")
        'What is written on the red tag?'
        >>> question_stem("Which tag is red? (A) the left one (B) the right one")
        'Which tag is red?'
        >>> question_stem("What is written on the red tag?")
        'What is written on the red tag?'
    """
    lines = question.splitlines()
    options = [i for i, line in enumerate(lines) if _OPTION_LINE.match(line)]
    if len(options) >= 2:
        m = _OPTION_LINE.match(lines[options[0]])
        if m and (m.group("p") or m.group("b")) in _FIRST_LABELS:
            stem = "\n".join(lines[: options[0]]).strip()
            return stem or question
    inline = _INLINE_OPTIONS.search(question)
    if inline:
        stem = question[: inline.start()].strip()
        return stem or question
    return question
