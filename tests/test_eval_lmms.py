"""lmms-eval's own evaluator with the visorlib plugin on a tiny local task equals ``visorlib eval``."""

from __future__ import annotations

import importlib.metadata
import json
import os
import tomllib
from pathlib import Path

import pytest
from eval_helpers import load, tiny_checkpoint

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'visorlib[lmms-eval]')")
datasets = pytest.importorskip("datasets", reason="the 'datasets' extra is not installed")

from visorlib.eval import evaluate, load_local  # noqa: E402

TASK_YAML = """task: visor_tiny_docvqa
dataset_path: {path}
dataset_kwargs:
  load_from_disk: true
test_split: validation
output_type: generate_until
doc_to_visual: !function tiny_utils.doc_to_visual
doc_to_text: !function tiny_utils.doc_to_text
doc_to_target: "answers"
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
metric_list:
  - metric: anls
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""

TASK_UTILS = '''def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs):
    return lmms_eval_specific_kwargs["pre_prompt"] + doc["question"] + lmms_eval_specific_kwargs["post_prompt"]
'''


def test_the_entry_point_is_declared_and_loads():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["lmms_eval.models"]["visorlib"]
    assert target == "visorlib.eval.lmms:manifest"
    from visorlib.eval.lmms import manifest

    assert manifest().model_id == "visorlib" and manifest().simple_class_path == "visorlib.eval.lmms.VisorlibLMM"
    installed = [ep for ep in importlib.metadata.entry_points(group="lmms_eval.models") if ep.name == "visorlib"]
    if installed:  # an up-to-date install (CI) exposes it to lmms-eval's registry
        assert installed[0].value == target


def save_tiny_docvqa(folder, rows, answers):
    table = datasets.Dataset.from_dict(
        {"question": [r.question.split("\n", 1)[1] for r in rows], "answers": answers,
         "image": [r.images()[0] for r in rows]},
        features=datasets.Features({"question": datasets.Value("string"),
                                    "answers": datasets.Sequence(datasets.Value("string")),
                                    "image": datasets.Image()}))
    datasets.DatasetDict({"validation": table}).save_to_disk(str(folder))
    return folder


def test_lmms_eval_with_the_plugin_matches_visorlib_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ckpt, data = tiny_checkpoint(tmp_path)
    rows = load_local(data).samples[:4]
    model, processor = load(ckpt)

    def ours(folder, name):
        report = evaluate(model, f"docvqa_val={folder}", configs="1,4", batch_size=2, max_new_tokens=3,
                          predictions=tmp_path / name, progress=False, processor=processor)
        lines = (tmp_path / name).read_text().splitlines()
        return report.row("docvqa_val", "1,4").score / 100, [json.loads(line)["prediction"] for line in lines]

    # The random model's answers are known only after a first run; references are then chosen so
    # that the score is neither 0 nor 1: the first answer exact, the longest one a letter off (an
    # ANLS between 0.5 and 1), the others wrong.
    _, first = ours(save_tiny_docvqa(tmp_path / "probe", rows, [r.answers for r in rows]), "probe.jsonl")
    answers = [[first[0]]] + [["zzzz"]] * 3
    longest = max(range(1, 4), key=lambda i: len(first[i]))
    if len(first[longest]) >= 2:
        answers[longest] = [first[longest][:-1] + ("x" if first[longest][-1] != "x" else "y")]
    saved = save_tiny_docvqa(tmp_path / "tiny_docvqa", rows, answers)
    score, predictions = ours(saved, "p.jsonl")
    assert 0.25 <= score < 0.5, (first, answers)

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "visor_tiny_docvqa.yaml").write_text(TASK_YAML.format(path=saved))
    (tasks / "tiny_utils.py").write_text(TASK_UTILS)

    from lmms_eval import evaluator
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    from visorlib.eval.lmms import manifest

    if "visorlib" not in MODEL_REGISTRY_V2.list_model_names():  # an install older than the entry point
        MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    monkeypatch.chdir(tmp_path)
    out = evaluator.simple_evaluate(
        model="visorlib", model_args=f"pretrained={ckpt},sa_layers=1-4", tasks=["visor_tiny_docvqa"],
        batch_size=2, device="cpu", task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    theirs = out["results"]["visor_tiny_docvqa"]["anls,none"]
    responses = [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0]
                 for s in sorted(out["samples"]["visor_tiny_docvqa"], key=lambda s: s["doc_id"])]
    assert len(responses) == 4 and responses == predictions == first
    assert theirs == pytest.approx(score)
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_loglikelihood_marks_the_greedy_answer_as_greedy(tmp_path):
    from types import SimpleNamespace

    from visorlib.eval import runner
    from visorlib.eval.lmms import VisorlibLMM

    ckpt, data = tiny_checkpoint(tmp_path)
    model, processor = load(ckpt)
    lmm = VisorlibLMM(model=model, processor=processor, sa_layers="1-4")
    samples = load_local(data).samples[:4]
    lmm.task_dict = {"t": {"s": [{"image": s.images()[0]} for s in samples]}}
    texts = [s.question.split("\n", 1)[1] for s in samples]
    encoded = [runner.encode_prompt(processor, s.question, s.images()) for s in samples]
    greedy = runner.generate_batch(model, processor, encoded, [1, 4], 3)
    row = max(range(4), key=lambda i: len(greedy[i].text))  # an answer with words in it
    assert greedy[row].text

    def request(continuation):
        return SimpleNamespace(args=(texts[row], continuation, lambda doc: [doc["image"]], row, "t", "s"))

    other = "apple" if greedy[row].text.split()[0] != "apple" else "bird"
    (lp_greedy, is_greedy), (lp_other, is_other) = lmm.loglikelihood([request(greedy[row].text), request(other)])
    assert is_greedy and not is_other
    assert lp_greedy <= 0 and lp_other <= 0
    # Generation through the plugin gives the same answer as visorlib eval's generate_batch.
    gen = SimpleNamespace(args=(texts[row], {"max_new_tokens": 3, "until": []}, lambda doc: [doc["image"]], row,
                                "t", "s"))
    assert [r.text for r in lmm.generate_until([gen])] == [greedy[row].text]
