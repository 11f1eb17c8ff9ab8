"""The answer metrics of the standard VQA benchmarks, each written once from its official definition.

Every metric takes a prediction (the model's decoded answer) and a list of reference answers and
returns a score in ``[0, 1]``:

* :func:`anls` — DocVQA / InfographicVQA: 1 - normalised Levenshtein distance, 0 below the 0.5
  threshold, best over references;
* :func:`relaxed_accuracy` — ChartQA: numbers within 5 % of the reference (``"12%"`` reads 0.12),
  exact case-insensitive match otherwise;
* :func:`vqa_accuracy` — VQAv2 / TextVQA: EvalAI answer normalisation, then min(1, matches / 3)
  averaged over the leave-one-out subsets of the (usually ten) human answers;
* :func:`exact_match` — GQA: case- and punctuation-insensitive equality;
* :func:`multiple_choice` — AI2D, ScienceQA, MMBench: the option letter read from the answer;
* :func:`ocrbench` — OCRBench: the reference contained in the prediction (whitespace removed for
  the handwritten-formula subset).

:data:`METRICS` maps each name to its function; :func:`score` dispatches on a name.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

from rapidfuzz.distance import Levenshtein

# -- edit distance -----------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Insertions + deletions + substitutions turning ``a`` into ``b`` (unit costs).

    rapidfuzz's C implementation of exactly this definition: a DocVQA run scores thousands of
    answers against several references each, and the textbook dynamic programme in Python was
    the slowest part of scoring.
    """
    return Levenshtein.distance(a, b)


def _squash(text: str) -> str:
    """Lower case, surrounding whitespace stripped, inner runs of whitespace collapsed."""
    return " ".join(text.strip().lower().split())


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one question (Biten et al., DocVQA).

    ``1 - lev(p, r) / max(len(p), len(r))`` after lower-casing and whitespace normalisation, the
    best over references; a similarity below ``threshold`` scores 0 (the answer is taken as
    wrong, not as partly right). Two empty strings are identical (similarity 1).
    """
    best = 0.0
    pred = _squash(prediction)
    for reference in references:
        ref = _squash(reference)
        longest = max(len(pred), len(ref))
        similarity = 1.0 if longest == 0 else 1.0 - levenshtein(pred, ref) / longest
        best = max(best, similarity)
    return best if best >= threshold else 0.0


# -- ChartQA -----------------------------------------------------------------------------------------


def _number(text: str) -> float | None:
    """``"12"`` -> 12.0, ``"12%"`` -> 0.12, anything else -> None (the ChartQA rule)."""
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA's relaxed correctness (Methani et al.), best over references.

    When both sides read as numbers (a trailing ``%`` divides by 100) and the reference is not
    zero, the prediction is right within ``tolerance`` relative error; otherwise the two strings
    must match, ignoring case and surrounding whitespace.
    """
    pred = prediction.strip()
    for reference in references:
        ref = str(reference).strip()
        p, r = _number(pred), _number(ref)
        if p is not None and r:
            if abs(p - r) / abs(r) <= tolerance:
                return 1.0
        elif pred.lower() == ref.lower():
            return 1.0
    return 0.0


# -- VQA accuracy (EvalAI normalisation) -------------------------------------------------------------

# EvalAI writes contractions with their apostrophes; answers are matched after stripping
# punctuation, so every apostrophe-less spelling maps back to the canonical one.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'd've who'll who're who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED:
        table[word.replace("'", "")] = word
        pieces = word.split("'")
        # Double contractions are also matched with one of their apostrophes missing.
        for keep in range(1, len(pieces) - 1):
            table["'".join(pieces[: keep + 1]) + "".join(pieces[keep + 1:])] = word
            table["".join(pieces[: keep + 1]) + "'" + "'".join(pieces[keep + 1:])] = word
    table.pop(_CONTRACTED[0].replace("'", ""), None)  # EvalAI leaves bare "aint" alone
    table["aint"] = "ain't"
    return {k: v for k, v in table.items() if k != v}


CONTRACTIONS = _contraction_table()
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a full stop, not a decimal point
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's answer normalisation (the VQA challenge's official evaluation).

    Lower case; ``,`` and ``?`` dropped and ``'s`` split off; each other punctuation mark removed
    where it touches a space (or the text has a digit-comma-digit) and replaced by a space
    elsewhere; full stops removed unless they are decimal points; number words to digits;
    articles dropped; apostrophe-less contractions restored (``dont`` -> ``don't``).
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or _DIGIT_COMMA.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD.sub("", out)
    words = [NUMBER_WORDS.get(w, w) for w in out.split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy: ``min(1, #humans who gave the answer / 3)``, averaged over leave-one-out subsets.

    With the usual ten human answers there are ten subsets of nine; a prediction three of the
    nine agree with scores 1 in that subset. With one reference this is exact match after
    normalisation (the single subset is the reference itself).
    """
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(str(r)) for r in references]
    if not refs:
        return 0.0
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for left_out in range(len(refs)):
        matches = sum(ref == pred for i, ref in enumerate(refs) if i != left_out)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# -- exact match, multiple choice, OCRBench ----------------------------------------------------------

_STRIP_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _plain(text: str) -> str:
    return " ".join(str(text).lower().translate(_STRIP_PUNCTUATION).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1 when the prediction equals a reference, ignoring case, punctuation and extra whitespace."""
    pred = _plain(prediction)
    return float(any(pred == _plain(r) for r in references))


_LETTER_PATTERNS = [
    re.compile(r"^\s*\(?([A-Z])\)?\s*(?:[.:)]|$)"),  # "B", "B.", "(B)", "B) cat", "B: cat"
    re.compile(r"(?i:answer|option|choice)(?i:\s+is)?\s*[:(]?\s*\(?([A-Z])\b"),  # "The answer is B"
    re.compile(r"\(([A-Z])\)"),  # "... (C) ..."
    re.compile(r"\b([A-Z])\."),  # "... C. cat"
]


def extract_choice(prediction: str, options: int = 26) -> str | None:
    """The option letter a free-form answer names, or None.

    Tried in order: a leading letter (``"B"``, ``"B."``, ``"(B)"``, ``"B) ..."``), "answer/option
    is B", a parenthesised letter, a letter followed by a full stop. Only the first ``options``
    letters count (so ``"I think ..."`` is not option I of a four-way question).
    """
    allowed = string.ascii_uppercase[:options]
    text = prediction.strip()
    if len(text) == 1 and text.upper() in allowed:  # a bare letter, whatever its case
        return text.upper()
    for pattern in _LETTER_PATTERNS:
        for match in pattern.finditer(text):
            letter = match.group(1)
            if letter in allowed:
                return letter
    return None


def multiple_choice(prediction: str, references: Sequence[str], options: int = 26) -> float:
    """1 when the letter :func:`extract_choice` reads equals the reference letter."""
    letter = extract_choice(prediction, options)
    return float(letter is not None and any(letter == str(r).strip().upper() for r in references))


def ocrbench(prediction: str, references: Sequence[str], handwritten_formula: bool = False) -> float:
    """OCRBench's rule: 1 when a reference occurs inside the prediction.

    Case-insensitive with newlines as spaces; for the handwritten mathematical expressions subset
    (HME100k) all whitespace is removed first, since a formula may be spaced any way.
    """
    def norm(text: str) -> str:
        text = str(text).strip().replace("\n", " ")
        return text.replace(" ", "") if handwritten_formula else text.lower()

    pred = norm(prediction)
    return float(any(norm(r) in pred for r in references))


METRICS: dict[str, Callable[..., float]] = {
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "vqa_accuracy": vqa_accuracy,
    "exact_match": exact_match,
    "multiple_choice": multiple_choice,
    "ocrbench": ocrbench,
}


def score(metric: str, prediction: str, references: Sequence[str], **options) -> float:
    """``METRICS[metric](prediction, references, **options)``, with a clear error for an unknown name."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(sorted(METRICS))})")
    if isinstance(references, str):
        references = [references]
    return float(METRICS[metric](prediction, list(references), **options))
