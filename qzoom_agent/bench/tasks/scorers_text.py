"""Free-text benchmark scorers: ANLS (DocVQA, InfoVQA), VQA accuracy (TextVQA), relaxed accuracy (ChartQA), OCRBench.

Each rule restates the reference evaluation the Q-Zoom paper used, lmms-eval 0.7.3 (the wheel on PyPI); every
function names the file and function it follows. ``tests/test_bench_scorers.py`` checks them case by case against
scores the reference functions themselves produced (``tests/fixtures/bench/scorer_reference.jsonl``).

Every scorer strips the prediction first: lmms-eval's ``ConfigurableTask.process_results``
(``lmms_eval/api/task.py``) strips each ``generate_until`` output before any task's rule sees it, and a few rules
below (ANLS's length) see the difference.
"""

from __future__ import annotations

import math
import re

from .base import BenchItem

# --- TextVQA: the EvalAI answer normalisation -------------------------------------------------------------------

# The EvalAI contraction table (lmms-eval 0.7.3, lmms_eval/tasks/_task_utils/vqa_eval_metric.py,
# EvalAIAnswerProcessor.CONTRACTIONS; the same table as the official VQA evaluation), quirks kept: the entries with
# capitals never fire (the text is lower-cased first) and "somebody'd" maps to "somebodyd".
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
# A period not followed by a digit goes ("3.5" keeps its point). The reference's pattern starts with "(?!<=\d)",
# a mistyped lookbehind that, as a lookahead at a ".", never fails, so it is left out here.
_PERIOD = re.compile(r"\.(?!\d)")
# The reference passes re.UNICODE (== 32) as re.sub's positional ``count``: only the first 32 periods go.
_PERIOD_COUNT = 32
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d),+(?=\d)")


def _strip_punctuation(text: str) -> str:
    """EvalAIAnswerProcessor.process_punctuation: a mark touching a space is deleted, any other becomes a space."""
    # Commas are already gone by now, so the digit-comma test never fires; kept because the reference tests it.
    glued = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # Decided on the text as it came in, not on the text being rewritten (as the reference does).
        delete = glued or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _map_words(text: str) -> str:
    """EvalAIAnswerProcessor.process_digit_article: number words to digits, articles out, contractions restored."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI answer normalisation TextVQA scores with.

    Source: lmms-eval 0.7.3, ``lmms_eval/tasks/_task_utils/vqa_eval_metric.py``, ``EvalAIAnswerProcessor.__call__``
    (copied there from MMF's EvalAI processor): lower-case, drop ``,`` and ``?``, split off ``'s``, remove or space
    out punctuation, drop periods not before a digit, map number words to digits, drop articles, restore
    contractions.

    Examples:
        >>> normalize_vqa_answer("The Two Dogs!")
        '2 dogs'
        >>> normalize_vqa_answer("1,000")
        '1000'
        >>> normalize_vqa_answer("dont stop.")
        "don't stop"
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _map_words(_strip_punctuation(text))


def textvqa_score(prediction: str, item: BenchItem) -> float:
    """TextVQA's VQA accuracy: min(1, matches / 3) against each 9 of the 10 answers, averaged over the 10.

    Source: lmms-eval 0.7.3, ``lmms_eval/tasks/textvqa/utils.py``, ``textvqa_process_results``: the prediction and
    every answer go through :func:`normalize_vqa_answer`; for each answer i, the matches among the other answers
    count; the mean over i is the score. No answers scores 0 (the reference would fail on an empty list).

    Examples:
        >>> item = BenchItem(0, "q", "textvqa", "", "", ("Nike",) * 3 + ("nike shoes",) * 7)
        >>> textvqa_score("nike", item)
        0.9
        >>> textvqa_score("NIKE SHOES.", item)
        1.0
    """
    if not item.answers:
        return 0.0
    predicted = normalize_vqa_answer(prediction.strip())
    hits = [normalize_vqa_answer(answer) == predicted for answer in item.answers]
    matches = sum(hits)
    # Leaving answer i out removes one match exactly when answer i itself matched.
    held_out = [min(1.0, (matches - hit) / 3) for hit in hits]
    return math.fsum(held_out) / len(held_out)


# --- DocVQA / InfoVQA: ANLS ----------------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each).

    Examples:
        >>> levenshtein("kitten", "sitting")
        3
    """
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for j, char_b in enumerate(b, start=1):
        current = [j]
        for i, char_a in enumerate(a, start=1):
            current.append(min(previous[i] + 1, current[i - 1] + 1, previous[i - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_distance(answer: str, prediction: str) -> float:
    """Edit distance of the case- and space-normalised strings over the longer RAW length (as the reference does)."""
    truth = " ".join(answer.strip().lower().split())
    guess = " ".join(prediction.strip().lower().split())
    # The reference divides by the lengths of the unnormalised strings (upper-cased), not of the compared ones.
    length = max(len(answer.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else levenshtein(truth, guess) / length


def anls_score(prediction: str, item: BenchItem, threshold: float = 0.5) -> float:
    """ANLS: 1 - the smallest normalised edit distance to any answer, zero below ``threshold`` (0.5).

    Source: lmms-eval 0.7.3, ``lmms_eval/api/metrics.py``, ``anls`` (after Qwen-VL's infographicsvqa_eval.py), the
    metric ``docvqa_val`` and ``infovqa_val`` declare (``lmms_eval/tasks/docvqa/docvqa_val.yaml``,
    ``lmms_eval/tasks/infovqa/infovqa_val.yaml``; no process_results of their own). Comparison ignores case and
    collapses whitespace; a similarity of exactly 0.5 is kept. No answers scores 0.

    Examples:
        >>> item = BenchItem(0, "q", "docvqa", "", "", ("abcd", "Total Cost"))
        >>> anls_score(" total  cost ", item)
        1.0
        >>> anls_score("abxy", item), anls_score("axyz", item)
        (0.5, 0.0)
    """
    if not item.answers:
        return 0.0
    predicted = prediction.strip()
    similarity = 1 - min(_anls_distance(answer, predicted) for answer in item.answers)
    return similarity if similarity >= threshold else 0.0


# --- ChartQA: relaxed accuracy ---------------------------------------------------------------------------------------

def _chartqa_number(text: str) -> float | None:
    """Python's float of the text ("12%" is 0.12), None when it is not one."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed correctness: numbers within 5% of a non-zero target, otherwise case-insensitive equality.

    Source: lmms-eval 0.7.3, ``lmms_eval/tasks/chartqa/utils.py``, ``relaxed_correctness`` (from Qwen-VL's
    evaluate_vqa.py). A zero target is compared as a string, since no relative change from 0 exists.

    Examples:
        >>> relaxed_match("105", "100"), relaxed_match("105.1", "100"), relaxed_match("Yes", "yes")
        (True, False, True)
    """
    predicted, expected = _chartqa_number(prediction), _chartqa_number(target)
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= max_relative_change
    return prediction.lower() == target.lower()


def chartqa_score(prediction: str, item: BenchItem) -> float:
    """ChartQA relaxed accuracy: 1.0 when :func:`relaxed_match` holds for an answer, else 0.0.

    Source: lmms-eval 0.7.3, ``lmms_eval/tasks/chartqa/utils.py``, ``chartqa_process_results``. ChartQA has one
    answer per question; should an item carry several, any match counts.

    Examples:
        >>> chartqa_score("48%", BenchItem(0, "q", "chartqa", "human_test", "", ("0.5",)))
        1.0
    """
    predicted = prediction.strip()
    return 1.0 if any(relaxed_match(predicted, answer) for answer in item.answers) else 0.0


# --- OCRBench -------------------------------------------------------------------------------------------------------

# The reference keys its formula rule on the record's ``dataset`` ("HME100k"); its question type, "Handwritten
# Mathematical Expression Recognition", holds exactly those 100 questions, so either name selects the rule.
OCRBENCH_FORMULA_CATEGORIES = frozenset({"HME100k", "Handwritten Mathematical Expression Recognition"})


def _fold_fullwidth(text: str) -> str:
    """Fullwidth ASCII (U+FF01..U+FF5E) to ASCII and the ideographic space to a space, nothing else."""
    return "".join(" " if c == "\u3000" else chr(ord(c) - 0xFEE0) if "\uff01" <= c <= "\uff5e" else c for c in text)


def _ocrbench_text(text: str) -> str:
    return _fold_fullwidth(text).lower().strip().replace("\n", " ")


def _ocrbench_formula(text: str) -> str:
    # Case kept ("x" and "X" differ in a formula); only plain spaces and newlines go.
    return text.strip().replace("\n", " ").replace(" ", "")


def ocrbench_score(prediction: str, item: BenchItem) -> float:
    """OCRBench: 1.0 when any answer is contained in the prediction, else 0.0.

    Source: lmms-eval 0.7.3, ``lmms_eval/tasks/ocrbench/utils.py``, ``ocrbench_process_results``. For handwritten
    formulas (``item.category`` in :data:`OCRBENCH_FORMULA_CATEGORIES`) both sides lose their spaces and newlines
    and case counts; otherwise both are fullwidth-folded, lower-cased and stripped, newlines read as spaces.

    Examples:
        >>> ocrbench_score("The sign says STOP.", BenchItem(0, "q", "ocrbench", "IIIT5K", "", ("stop",)))
        1.0
        >>> formula = BenchItem(0, "q", "ocrbench", "HME100k", "", ("x ^ { 2 }",))
        >>> ocrbench_score("x^{2}", formula), ocrbench_score("X^{2}", formula)
        (1.0, 0.0)
    """
    predicted = prediction.strip()
    normalize = _ocrbench_formula if item.category in OCRBENCH_FORMULA_CATEGORIES else _ocrbench_text
    return 1.0 if any(normalize(answer) in normalize(predicted) for answer in item.answers) else 0.0
