"""The lmms-eval plugin against lmms-eval 0.7.3's own model API.

A real multi-round task definition (``output_type: generate_until_multi_round``, lmms-eval's
7-tuple requests) and a chat task (``--model visorlib_chat``, ``doc_to_messages``) through
lmms-eval's evaluator, each answer equal to visorlib's own generation of the same prompt;
requests of two tasks in one batch each get their own generation kwargs (lmms-eval's Collator);
sampling is allowed and seeded; results are ``GenerationResult`` with token counts; and two
processes (torchrun, gloo on CPU) score every document exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from eval_helpers import load, tiny_checkpoint

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'visorlib[lmms-eval]')")
datasets = pytest.importorskip("datasets", reason="the 'datasets' extra is not installed")

from lmms_eval.api.instance import GenerationResult  # noqa: E402

from visorlib.eval import load_local, runner  # noqa: E402
from visorlib.eval.lmms import VisorlibChatLMM, VisorlibLMM, chat_manifest, manifest  # noqa: E402

MULTI_ROUND_YAML = """task: visor_tiny_rounds
dataset_path: {path}
dataset_kwargs:
  load_from_disk: true
test_split: validation
output_type: generate_until_multi_round
doc_to_visual: !function rounds_utils.doc_to_visual
doc_to_text: !function rounds_utils.doc_to_text
doc_to_target: "answers"
process_results: !function rounds_utils.process_results
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
metric_list:
  - metric: rounds
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    post_prompt: " Answer briefly."
"""

# Round 0 asks the question; round i asks the model to go on from its previous answer; even
# documents stop after two rounds, odd ones after three (so a batch loses a member midway).
ROUNDS_UTILS = '''def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def rounds_of(doc):
    return 2 + doc["number"] % 2


def follow_up(doc, previous):
    return "Again: " + previous[-1] + " " + doc["question"]


def doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None, previous_round_info=None):
    if round_idx is None:
        return doc["question"] + lmms_eval_specific_kwargs["post_prompt"]
    if round_idx == rounds_of(doc):
        return None, None, True, previous_output, None
    return [doc["image"].convert("RGB")], follow_up(doc, previous_output), False, previous_output, {"round": round_idx}


def process_results(doc, results):
    answers = results[0] if isinstance(results[0], list) else results
    return {"rounds": float(len(answers) == rounds_of(doc))}
'''

DOCVQA_YAML = """task: visor_tiny_chat
dataset_path: {path}
dataset_kwargs:
  load_from_disk: true
test_split: validation
output_type: generate_until
doc_to_visual: !function chat_utils.doc_to_visual
doc_to_text: !function chat_utils.doc_to_text
doc_to_target: "answers"
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
metric_list:
  - metric: anls
    aggregation: mean
    higher_is_better: true
"""

CHAT_UTILS = '''def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]
'''


def save_rows(folder, rows):
    table = datasets.Dataset.from_dict(
        {"question": [r.question.split("\n", 1)[1] for r in rows], "answers": [r.answers for r in rows],
         "number": list(range(len(rows))), "image": [r.images()[0] for r in rows]},
        features=datasets.Features({"question": datasets.Value("string"),
                                    "answers": datasets.Sequence(datasets.Value("string")),
                                    "number": datasets.Value("int64"), "image": datasets.Image()}))
    datasets.DatasetDict({"validation": table}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmms_forms")
    ckpt, data = tiny_checkpoint(tmp, samples=5)
    rows = load_local(data).samples[:5]
    model, processor = load(ckpt)
    return SimpleNamespace(tmp=tmp, ckpt=ckpt, rows=rows, model=model, processor=processor,
                           saved=save_rows(tmp / "tiny", rows))


def task_folder(tmp: Path, name: str, yaml_text: str, utils_name: str, utils: str) -> Path:
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml_text)
    (folder / f"{utils_name}.py").write_text(utils)
    return folder


def run_evaluator(model_id: str, model_args: str, task: str, folder: Path, batch_size: int = 2):
    from lmms_eval import evaluator
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    for item in (manifest(), chat_manifest()):
        MODEL_REGISTRY_V2.register_manifest(item, overwrite=True)
    out = evaluator.simple_evaluate(model=model_id, model_args=model_args, tasks=[task], batch_size=batch_size,
                                    device="cpu", task_manager=TaskManager(include_path=str(folder)), log_samples=True)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out, samples


def answer(setup, question: str, images, limit: int = 3) -> str:
    encoded = runner.encode_prompt(setup.processor, "<image>\n" * len(images) + question, images)
    return runner.generate_batch(setup.model, setup.processor, [encoded], [1, 4], limit)[0].text


def test_a_real_multi_round_task_runs_through_the_evaluator(setup, monkeypatch):
    """lmms-eval 0.7.3 sends 7-tuples (the old plugin failed every one with a ValueError)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = task_folder(setup.tmp, "visor_tiny_rounds", MULTI_ROUND_YAML.format(path=setup.saved),
                         "rounds_utils", ROUNDS_UTILS)
    monkeypatch.chdir(setup.tmp)
    out, samples = run_evaluator("visorlib", f"pretrained={setup.ckpt},sa_layers=1-4", "visor_tiny_rounds", folder)
    assert out["results"]["visor_tiny_rounds"]["rounds,none"] == 1.0
    assert [s["doc_id"] for s in samples] == list(range(5))
    for number, sample in enumerate(samples):
        rounds = sample["resps"][0]
        rounds = rounds[0] if isinstance(rounds[0], list) else rounds
        row, image = setup.rows[number], setup.rows[number].images()[0].convert("RGB")
        question = row.question.split("\n", 1)[1]
        expected = [answer(setup, question + " Answer briefly.", [image])]
        while len(expected) < 2 + number % 2:
            expected.append(answer(setup, "Again: " + expected[-1] + " " + question, [image]))
        assert rounds == expected


def test_the_chat_form_renders_the_tasks_messages(setup, monkeypatch):
    """``--model visorlib_chat``: the task's messages (lmms-eval builds them from doc_to_visual /
    doc_to_text) rendered with the chat template, answered like visorlib's own processor.chat."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = task_folder(setup.tmp, "visor_tiny_chat", DOCVQA_YAML.format(path=setup.saved), "chat_utils",
                         CHAT_UTILS)
    monkeypatch.chdir(setup.tmp)
    out, samples = run_evaluator("visorlib_chat", f"pretrained={setup.ckpt},sa_layers=1-4", "visor_tiny_chat",
                                 folder)
    assert "anls,none" in out["results"]["visor_tiny_chat"]
    for number, sample in enumerate(samples):
        row = setup.rows[number]
        messages = [{"role": "user", "content": [{"type": "image", "image": row.images()[0].convert("RGB")},
                                                 {"type": "text", "text": row.question.split("\n", 1)[1]}]}]
        encoded = setup.processor.chat(messages, return_tensors="pt")
        encoded = {k: v for k, v in encoded.items() if k not in ("attention_mask", "batch_num_images")}
        encoded["input_ids"] = encoded["input_ids"][0]
        expected = runner.generate_batch(setup.model, setup.processor, [encoded], [1, 4], 3)[0].text
        got = sample["resps"][0][0] if isinstance(sample["resps"][0], list) else sample["resps"][0]
        assert got == expected


def request(args):
    return SimpleNamespace(args=args)


def test_a_batch_spanning_two_tasks_runs_each_with_its_own_kwargs(setup):
    """The old plugin took chunk[0]'s kwargs for the whole chunk: the 6-token task got 1 token."""
    lmm = VisorlibLMM(model=setup.model, processor=setup.processor, sa_layers="1-4", batch_size=4)
    lmm.task_dict = {"t": {"s": [{"image": r.images()[0]} for r in setup.rows]}}
    questions = [r.question.split("\n", 1)[1] for r in setup.rows]
    short, long = {"max_new_tokens": 1, "until": []}, {"max_new_tokens": 6, "until": []}
    kwargs = [short, long, short, long]
    results = lmm.generate_until([request((questions[i], dict(kwargs[i]), lambda doc: [doc["image"]], i, "t", "s"))
                                  for i in range(4)])
    assert all(isinstance(r, GenerationResult) for r in results)
    for i, result in enumerate(results):
        image = setup.rows[i].images()[0].convert("RGB")
        encoded = runner.encode_prompt(setup.processor, "<image>\n" + questions[i], [image])
        expected = runner.generate_batch(setup.model, setup.processor, [encoded], [1, 4],
                                         kwargs[i]["max_new_tokens"])[0]
        assert result.text == expected.text
        assert result.token_counts.output_tokens == expected.tokens <= kwargs[i]["max_new_tokens"]
        assert result.token_counts.input_tokens == encoded["input_ids"].shape[0]
    assert max(r.token_counts.output_tokens for r in results[1::2]) > 1


def test_sampling_is_allowed_and_seeded(setup):
    sampled = {"max_new_tokens": 5, "do_sample": True, "temperature": 1.5, "until": []}

    def run(seed):
        lmm = VisorlibLMM(model=setup.model, processor=setup.processor, sa_layers="1-4", batch_size=2, seed=seed)
        lmm.task_dict = {"t": {"s": [{"image": r.images()[0]} for r in setup.rows]}}
        reqs = [request((r.question.split("\n", 1)[1], dict(sampled), lambda doc: [doc["image"]], i, "t", "s"))
                for i, r in enumerate(setup.rows[:4])]
        return [r.text for r in lmm.generate_until(reqs)]

    first = run(0)
    assert first == run(0)
    assert any(run(seed) != first for seed in (1, 2, 3))  # sampling, not greedy decoding
    with pytest.raises(ValueError, match="num_beams=4: beam search is not supported"):
        lmm = VisorlibLMM(model=setup.model, processor=setup.processor)
        lmm.task_dict = {"t": {"s": [{"image": setup.rows[0].images()[0]}]}}
        lmm.generate_until([request(("q", {"num_beams": 4}, lambda doc: [doc["image"]], 0, "t", "s"))])


def test_the_chat_form_refuses_loglikelihood_and_the_manifests_are_distinct():
    assert manifest().simple_class_path.endswith("VisorlibLMM") and manifest().chat_class_path is None
    assert chat_manifest().model_id == "visorlib_chat" and chat_manifest().chat_class_path.endswith("VisorlibChatLMM")
    assert VisorlibChatLMM.is_simple is False and VisorlibLMM.is_simple is True


WORKER = '''import json, os, sys
from pathlib import Path

from lmms_eval import evaluator
from lmms_eval.models import MODEL_REGISTRY_V2
from lmms_eval.tasks import TaskManager

from visorlib.eval import lmms as plugin

ckpt, folder, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
MODEL_REGISTRY_V2.register_manifest(plugin.manifest(), overwrite=True)
seen = []
original = plugin.VisorlibLMM.generate_until


def recording(self, requests):
    seen.extend(int(r.args[3]) for r in requests)
    self_info.update(rank=self.rank, world=self.world_size)
    return original(self, requests)


self_info = {}
plugin.VisorlibLMM.generate_until = recording
result = evaluator.simple_evaluate(model="visorlib", model_args=f"pretrained={ckpt},sa_layers=1-4",
                                   tasks=["visor_tiny_chat"], batch_size=2, device="cpu",
                                   task_manager=TaskManager(include_path=folder), log_samples=True,
                                   distributed_executor_backend="torchrun")  # gloo on CPU
rank = int(os.environ["RANK"])
record = dict(self_info, generated=seen)
if result is not None:
    record["samples"] = [int(s["doc_id"]) for s in result["samples"]["visor_tiny_chat"]]
(out / f"rank{rank}.json").write_text(json.dumps(record))
'''


def test_two_processes_score_every_document_exactly_once(setup, tmp_path):
    folder = task_folder(setup.tmp, "visor_tiny_chat", DOCVQA_YAML.format(path=setup.saved), "chat_utils",
                         CHAT_UTILS)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
               str(worker), str(setup.ckpt), str(folder), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    # Five documents: rank 0 scores 0, 2, 4 and rank 1 scores 1, 3 (plus one padding copy of 3,
    # which the evaluator drops).
    assert set(ranks[0]["generated"]).isdisjoint(ranks[1]["generated"])
    assert sorted(set(ranks[0]["generated"]) | set(ranks[1]["generated"])) == list(range(5))
    assert sorted(ranks[0]["samples"]) == list(range(5))
