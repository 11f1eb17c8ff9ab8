"""Evaluation data: benchmark-shaped datasets from disk (offline), local files, the task registry."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from visorlib.eval import TASKS, load_data, load_local, load_task
from visorlib.eval.metrics import METRICS

datasets = pytest.importorskip("datasets", reason="the 'datasets' extra is not installed (pip install 'visorlib[eval]')")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def images(n):
    return [Image.new("RGB", (40 + 10 * i, 30), (20 * i, 100, 200)) for i in range(n)]


def test_a_docvqa_shaped_dataset_saved_to_disk(tmp_path):
    table = datasets.Dataset.from_dict(
        {"questionId": [7, 8], "question": ["What is the date?", "Who signed?"],
         "answers": [["1 May", "May 1"], ["J. Doe"]], "image": images(2)},
        features=datasets.Features({"questionId": datasets.Value("int64"), "question": datasets.Value("string"),
                                    "answers": datasets.Sequence(datasets.Value("string")),
                                    "image": datasets.Image()}))
    datasets.DatasetDict({"validation": table}).save_to_disk(str(tmp_path / "docvqa"))
    loaded = load_data(f"docvqa_val={tmp_path / 'docvqa'}")
    assert [s.question for s in loaded.samples] == [
        "<image>\nWhat is the date?\nAnswer the question using a single word or phrase.",
        "<image>\nWho signed?\nAnswer the question using a single word or phrase."]
    assert [s.answers for s in loaded.samples] == [["1 May", "May 1"], ["J. Doe"]]
    assert {s.metric for s in loaded.samples} == {"anls"}
    assert loaded.samples[1].images()[0].size == (50, 30)
    with pytest.raises(ValueError, match="no split 'test'"):
        load_task("docvqa_val", tmp_path / "docvqa", split="test")


def test_a_chartqa_shaped_dataset_saved_to_disk(tmp_path):
    table = datasets.Dataset.from_dict(
        {"question": ["How many in 2020?", "Which is larger?", "Share?"], "answer": ["12", "Blue", "40%"],
         "type": ["human_test", "augmented_test", "human_test"], "image": images(3)},
        features=datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                    "type": datasets.Value("string"), "image": datasets.Image()}))
    table.save_to_disk(str(tmp_path / "chartqa"))
    loaded = load_task("chartqa", tmp_path / "chartqa")
    assert loaded.samples[0].question == "<image>\nHow many in 2020?\nAnswer the question with a single word."
    assert [s.category for s in loaded.samples] == ["human_test", "augmented_test", "human_test"]
    assert [s.metric for s in loaded.samples] == ["relaxed_accuracy"] * 3
    assert loaded.samples[2].answers == ["40%"]
    with pytest.raises(ValueError, match=r"needs column\(s\) \['type'\]"):
        table.remove_columns(["type"]).save_to_disk(str(tmp_path / "bad"))
        load_task("chartqa", tmp_path / "bad")


def test_multiple_choice_tasks_write_options_and_letters(tmp_path):
    table = datasets.Dataset.from_dict(
        {"question": ["Which eats plants?"], "options": [["fox", "deer", "owl"]], "answer": ["1"], "image": images(1)},
        features=datasets.Features({"question": datasets.Value("string"),
                                    "options": datasets.Sequence(datasets.Value("string")),
                                    "answer": datasets.Value("string"), "image": datasets.Image()}))
    table.save_to_disk(str(tmp_path / "ai2d"))
    sample = load_task("ai2d", tmp_path / "ai2d").samples[0]
    assert sample.question == ("<image>\nWhich eats plants?\nA. fox\nB. deer\nC. owl\n"
                               "Answer with the option's letter from the given choices directly.")
    assert sample.answers == ["B"] and sample.metric_options == {"options": 3}


def test_every_task_names_a_known_metric():
    assert set(TASKS) >= {"docvqa_val", "infovqa_val", "chartqa", "textvqa_val", "ocrbench", "gqa", "ai2d",
                          "scienceqa_img", "mmbench_en_dev"}
    assert all(spec.metric in METRICS for spec in TASKS.values())
    with pytest.raises(ValueError, match="unknown task"):
        load_task("nope")
    with pytest.raises(ValueError, match="expected a .json/.jsonl file, a task name"):
        load_data("data.csv")


def test_local_rows_answers_category_and_metric(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "answers": ["Red", "red"], "category": "colour", "metric": "vqa_accuracy",
         "conversations": [{"from": "human", "value": "<image>\nWhich colour?"}, {"from": "gpt", "value": "x"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "a"}]},
        {"image": "a.png", "metric": "bleu", "answers": "a", "conversations": [{"from": "human", "value": "Q"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    loaded = load_local(tmp_path / "d.json")
    first, second = loaded.samples
    assert (first.answers, first.category, first.metric) == (["Red", "red"], "colour", "vqa_accuracy")
    assert (second.answers, second.metric, second.question) == (["a"], "exact_match", "<image>\nWhat?")
    assert loaded.problems == [(2, f"{tmp_path / 'd.json'}[2]: unknown metric 'bleu' (known: "
                                   f"{', '.join(sorted(METRICS))})")]


def test_rows_of_a_training_dataset_become_samples(tmp_path):
    from visorlib.data.conversations import ConversationDataset
    from visorlib.data.specs import DatasetSpec
    from visorlib.eval import from_training_data

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": f"<image>\nq{i}"},
                                                  {"from": "gpt", "value": f"a{i}"}]} for i in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = ConversationDataset(DatasetSpec(path=str(tmp_path / "train.jsonl")), None, max_length=0)
    held_out = from_training_data(source, indices=[3, 1])
    assert [(s.index, s.answers) for s in held_out.samples] == [(1, ["a1"]), (3, ["a3"])]
    assert held_out.samples[0].images()[0].size == (20, 20)
