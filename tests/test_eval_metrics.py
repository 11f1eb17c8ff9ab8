"""Each metric against cases worked by hand from its official definition."""

from __future__ import annotations

import pytest

from visorlib.eval.metrics import (
    anls,
    exact_match,
    extract_choice,
    levenshtein,
    multiple_choice,
    normalize_vqa_answer,
    ocrbench,
    relaxed_accuracy,
    score,
    vqa_accuracy,
)


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("", "") == 0


def test_anls_threshold_references_and_normalisation():
    ref = ["abcdefghij"]
    assert anls("abcdefXXXX", ref) == pytest.approx(0.6)  # 4 edits of 10
    assert anls("abcdeXXXXX", ref) == pytest.approx(0.5)  # exactly the threshold: kept
    assert anls("abcdXXXXXX", ref) == 0.0  # 0.4 < 0.5: wrong, not partly right
    assert anls("color", ["red", "colour"]) == pytest.approx(5 / 6)  # best over references
    assert anls("  Hello   World ", ["hello world"]) == 1.0  # case and whitespace
    assert anls("", ["abc"]) == 0.0
    assert anls("", [""]) == 1.0
    assert anls("x", []) == 0.0


def test_relaxed_accuracy_numbers_percent_and_strings():
    assert relaxed_accuracy("12%", ["0.12"]) == 1.0  # a percent sign divides by 100
    assert relaxed_accuracy("0.12", ["12%"]) == 1.0
    assert relaxed_accuracy("12", ["0.12"]) == 0.0
    assert relaxed_accuracy("12", ["12%"]) == 0.0
    assert relaxed_accuracy("104", ["100"]) == 1.0 and relaxed_accuracy("105", ["100"]) == 1.0
    assert relaxed_accuracy("106", ["100"]) == 0.0 and relaxed_accuracy("-96", ["-100"]) == 1.0
    assert relaxed_accuracy(" Yes ", ["yes"]) == 1.0 and relaxed_accuracy("no", ["yes"]) == 0.0
    # A zero reference has no relative tolerance: the strings must match.
    assert relaxed_accuracy("0", ["0"]) == 1.0 and relaxed_accuracy("0.0", ["0"]) == 0.0
    assert relaxed_accuracy("", ["5"]) == 0.0
    assert relaxed_accuracy("7", ["3", "7.2"]) == 1.0  # any reference


def test_evalai_normalisation():
    assert normalize_vqa_answer("Two") == "2"
    assert normalize_vqa_answer("the cat.") == "cat"
    assert normalize_vqa_answer("A dog!") == "dog"
    assert normalize_vqa_answer("dont") == "don't"
    assert normalize_vqa_answer("3.5") == "3.5"  # a decimal point stays
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("red-white") == "red white"  # a dash between words becomes a space
    assert normalize_vqa_answer("Yes, it is") == "yes it is"


def test_vqa_accuracy_over_leave_one_out_subsets():
    # Left out a "two": 2 of the other 9 agree -> 2/3; left out a "three": 3 agree -> 1.
    assert vqa_accuracy("2", ["two"] * 3 + ["three"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("The Cat", ["cat"] * 10) == 1.0
    assert vqa_accuracy("", ["cat"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"]) == 1.0  # one reference: normalised exact match


def test_exact_match_and_multiple_choice():
    assert exact_match("Yes.", ["yes"]) == 1.0 and exact_match("no", ["yes"]) == 0.0
    assert extract_choice("B") == "B" and extract_choice("b") == "B"
    assert extract_choice("(C) a cat") == "C"
    assert extract_choice("The answer is D.") == "D"
    assert extract_choice("A. apple") == "A"
    assert extract_choice("I think so", options=4) is None
    assert extract_choice("") is None
    assert multiple_choice("B. because", ["B"]) == 1.0 and multiple_choice("C", ["B"]) == 0.0
    assert multiple_choice("no idea", ["A"]) == 0.0


def test_ocrbench_substring_rule():
    assert ocrbench("The text says HELLO world", ["hello"]) == 1.0
    assert ocrbench("goodbye", ["hello", "bye"]) == 1.0
    assert ocrbench("x ^ 2", ["x^2"]) == 0.0
    assert ocrbench("x ^ 2", ["x^2"], handwritten_formula=True) == 1.0


def test_score_dispatch():
    assert score("anls", "abc", "abc") == 1.0  # a single reference may be a string
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score("bleu", "a", ["a"])
