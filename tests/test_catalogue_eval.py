"""Issue 17's catalogue, evaluation half: every row is a clear error or the right number.

Silent rows assert the right number (a cached run's report equals a fresh run's) or the untouched
file; unclear rows assert the exit code or exception and that the message names the key, file or
sample. The models are tiny random checkpoints (``eval_helpers``); answers are made "right" by
writing a first run's predictions into the references, so a wrongly reused line shows as a wrong
score.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from eval_helpers import tiny_checkpoint

import visorlib
from visorlib.cli import main
from visorlib.eval import evaluate
from visorlib.eval.runner import EvalIncomplete
from visorlib.train import DataError

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--configs", "1,4", "--max-new-tokens", "2", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(folder, checkpoint, other checkpoint of the same card, data.jsonl)``."""
    folder = tmp_path_factory.mktemp("catalogue")
    ckpt, data = tiny_checkpoint(folder, samples=2)
    other = folder / "other"  # same card name, other weights
    torch.manual_seed(1)
    visorlib.zoo.instantiate(visorlib.get_config("visor-llava-ov-0.5b").tiny()).eval().save_pretrained(other)
    shutil.copy(ckpt / "tokenizer.json", other / "tokenizer.json")
    return folder, ckpt, other, data


def rows_of(data: Path, limit: int = 4) -> list[dict]:
    return [json.loads(line) for line in data.read_text().splitlines()[:limit]]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def keyed(tiny, tmp_path):
    """Data (in the synthetic folder, so its images resolve) whose references are the first model's answers."""
    folder, ckpt, _, data = tiny
    evaluate(str(ckpt), str(data), configs="1,4", limit=4, max_new_tokens=2, progress=False,
             predictions=tmp_path / "first.jsonl")
    answers = {r["index"]: r["prediction"] for r in records(tmp_path / "first.jsonl")}
    rows = rows_of(data)
    for index, row in enumerate(rows):
        row["answers"] = [answers[index]]
    path = write_rows(data.parent / f"keyed_{tmp_path.name}.jsonl", rows)
    yield path
    path.unlink()


def score(report, dataset: str) -> tuple[float, int]:
    row = report.row(dataset, "1,4")
    return row.score, row.samples


# -- silent rows 1-3: a line is reused only for what produced it ------------------------------------


@pytest.mark.parametrize("change", ["other_weights", "references", "metric"])
def test_a_cached_line_is_reused_only_for_what_produced_it(tiny, keyed, tmp_path, change, capsys):
    _, ckpt, other, _ = tiny
    cache = tmp_path / "p.jsonl"
    name = keyed.stem
    code, _, err = eval_cli(capsys, ckpt, "--data", keyed, "--predictions", cache, *BASE)
    assert code == 0 and "reused 0 of 4 predictions" in err
    code, _, err = eval_cli(capsys, ckpt, "--data", keyed, "--predictions", cache, *BASE)
    assert code == 0 and "reused 4 of 4 predictions" in err  # nothing changed: everything reused
    first = evaluate(str(ckpt), str(keyed), configs="1,4", max_new_tokens=2, progress=False, predictions=cache)
    assert score(first, name) == (100.0, 4)  # the references are this model's answers
    model, data, options = str(ckpt), keyed, {}
    if change == "other_weights":
        model = str(other)
    elif change == "references":
        rows = [dict(r, answers=["certainly-not-the-answer"]) for r in map(json.loads, keyed.read_text().splitlines())]
        write_rows(keyed, rows)
    else:
        options = {"metric": "ocrbench"}
    cached = evaluate(model, str(data), configs="1,4", max_new_tokens=2, progress=False, predictions=cache, **options)
    fresh = evaluate(model, str(data), configs="1,4", max_new_tokens=2, progress=False,
                     predictions=tmp_path / "fresh.jsonl", **options)
    assert cached.predictions["reused"] == 0 and cached.predictions["stale"] == 4
    assert score(cached, name) == score(fresh, name)
    if change != "metric":
        assert score(cached, name)[0] < 100.0  # the old 100 % would have been reported
    else:
        assert cached.row(name, "1,4").metric == "ocrbench"
    assert len(records(cache)) == 8  # the first lines are kept (still right for what produced them)


def test_an_in_memory_model_changed_between_runs_is_not_reused(tiny, tmp_path):
    _, ckpt, _, data = tiny
    model = visorlib.from_pretrained(ckpt)
    processor = visorlib.processor_for(model)
    options = dict(configs="1,4", limit=2, max_new_tokens=2, progress=False, processor=processor,
                   predictions=tmp_path / "p.jsonl")
    assert evaluate(model, str(data), **options).predictions["generated"] == 2
    assert evaluate(model, str(data), **options).predictions["reused"] == 2
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert evaluate(model, str(data), **options).predictions["reused"] == 0


# -- silent row 4: one run per predictions file; duplicates read once -------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from visorlib.cli import main
    from visorlib.eval import runner
    real = runner.generate_batch
    ready, go = Path(sys.argv[1]), Path(sys.argv[2])

    def waits(*args, **kwargs):  # holds the run (and its lock) open until the test says go
        ready.touch()
        while not go.exists():
            time.sleep(0.05)
        return real(*args, **kwargs)

    runner.generate_batch = waits
    sys.exit(main(["eval", *sys.argv[3:]]))
""")


def test_a_second_concurrent_run_is_refused_naming_the_holder(tiny, tmp_path, capsys):
    _, ckpt, _, data = tiny
    cache = tmp_path / "c.jsonl"
    args = [str(ckpt), "--data", str(data), "--predictions", str(cache), "--limit", "3", *BASE]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ready, go = tmp_path / "ready", tmp_path / "go"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ready), str(go), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ready.exists():
            assert holder.poll() is None, holder.communicate()[1]
            assert time.time() < deadline, "the first run never started generating"
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "visorlib.cli", "eval", *args], env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"--predictions {cache} is in use by another visorlib eval (pid {holder.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        go.touch()
        out, err = holder.communicate(timeout=300)
    assert holder.returncode == 0, err
    lines = records(cache)
    assert len(lines) == 3 and len({r["fingerprint"] for r in lines}) == 3
    # A third run reuses all three; lines appended twice (by an older, unlocked version) count once.
    cache.write_text(cache.read_text() * 2)
    code, _, err = eval_cli(capsys, *args)
    assert code == 0 and "reused 3 of 3 predictions" in err
    report = evaluate(str(ckpt), str(data), configs="1,4", limit=3, max_new_tokens=2, progress=False,
                      predictions=cache)
    assert report.row("data", "1,4").samples == 3


# -- silent rows 5-6: outputs never overwrite inputs or files eval did not write ---------------------


@pytest.mark.parametrize("flag,target,named", [
    ("--json", "data", "the data file"),
    ("--predictions", "data", "the data file"),
    ("--plot", "image", "an image of"),
    ("--json", "notes", "exists and is not a visorlib eval report"),
    ("--predictions", "notes", "exists and is not a predictions file"),
    ("--plot", "notes", "exists and is not a plot written by visorlib eval"),
])
def test_an_output_that_is_an_input_or_a_users_file_is_refused_untouched(tiny, tmp_path, capsys, flag, target, named):
    _, ckpt, _, data = tiny
    subset = write_rows(data.parent / f"subset_{tmp_path.name}.jsonl", rows_of(data, 2))
    try:
        path = {"data": subset, "image": data.parent / rows_of(data, 1)[0]["image"], "notes": tmp_path / "notes.txt"}[target]
        if target == "notes":
            path.write_text("my notes\n")
        before = path.read_bytes()
        code, out, err = eval_cli(capsys, ckpt, "--data", subset, flag, path, *BASE)
        assert code == 2 and f"{flag} {path}" in err and named in err and "refusing to overwrite" in err
        assert path.read_bytes() == before and out == ""
    finally:
        subset.unlink()


def test_outputs_eval_wrote_may_be_rewritten_but_not_onto_each_other(tiny, tmp_path, capsys):
    _, ckpt, _, data = tiny
    out = [tmp_path / "r.json", tmp_path / "p.jsonl", tmp_path / "plot.png"]
    args = [ckpt, "--data", data, "--limit", "1", "--json", out[0], "--predictions", out[1], "--plot", out[2], *BASE]
    assert eval_cli(capsys, *args)[0] == 0
    assert eval_cli(capsys, *args)[0] == 0  # its own report, predictions and plot are its to replace
    code, _, err = eval_cli(capsys, ckpt, "--data", data, "--json", out[1], "--predictions", out[1], *BASE)
    assert code == 2 and "is also the --json output" in err


# -- silent row 7: the reserved category ------------------------------------------------------------


def test_a_row_of_category_all_is_refused_and_not_counted_twice(tiny, tmp_path):
    _, ckpt, _, data = tiny
    rows = rows_of(data)
    rows[0]["category"] = rows[1]["category"] = "all"
    path = write_rows(data.parent / f"cat_{tmp_path.name}.jsonl", rows)
    try:
        report = evaluate(str(ckpt), str(path), configs="1,4", max_new_tokens=2, progress=False, max_skip_fraction=1)
        assert report.row(path.stem, "1,4").samples == 2  # the two other rows, once each
        assert [s["index"] for s in report.skipped] == [0, 1]
        assert f"{path}[0]: category 'all' is reserved" in report.skipped[0]["error"]
    finally:
        path.unlink()


# -- unclear rows: data ------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,named", [
    ("answers", {"a": 1}, "'answers' must be a string or a list of strings, got dict"),
    ("answers", [None], "'answers' must be a string or a list of strings, got list [None]"),
    ("answers", True, "'answers' must be a string or a list of strings, got bool"),
    ("image", 5, "'image' must be a file name or a list of file names, got int 5"),
    ("image", {"path": "images/page_00000.png"}, "'image' must be a file name or a list of file names, got dict"),
])
def test_bad_row_values_name_the_row_and_key(tiny, tmp_path, capsys, field, value, named):
    _, ckpt, _, data = tiny
    rows = rows_of(data, 2)
    rows[1][field] = value
    path = write_rows(data.parent / f"bad_{tmp_path.name}.jsonl", rows)
    try:
        code, _, err = eval_cli(capsys, ckpt, "--data", path, "--on-error", "fail", *BASE)
        assert code == 2 and f"{path}[1]: {named}" in err
    finally:
        path.unlink()


def test_a_latin1_data_file_is_named(tiny, tmp_path, capsys):
    path = tmp_path / "latin.jsonl"
    row = rows_of(tiny[3], 1)[0]
    row["answers"] = ["café"]
    path.write_bytes(json.dumps(row, ensure_ascii=False).encode("latin-1") + b"\n")
    code, _, err = eval_cli(capsys, tiny[1], "--data", path, *BASE)
    assert code == 2 and f"{path}: not UTF-8 text" in err and "save the file as UTF-8" in err


def test_an_image_outside_the_root_names_evals_option(tiny, tmp_path, capsys):
    _, ckpt, _, data = tiny
    shutil.copy(data.parent / rows_of(data, 1)[0]["image"], tmp_path / "outside.png")
    row = dict(rows_of(data, 1)[0], image=str(tmp_path / "outside.png"))
    path = write_rows(data.parent / f"out_{tmp_path.name}.jsonl", [row])
    try:
        code, _, err = eval_cli(capsys, ckpt, "--data", path, *BASE)
        assert code == 2 and f"{path}[0]: image" in err and "set --allow-outside-image-root" in err
        assert eval_cli(capsys, ckpt, "--data", path, "--allow-outside-image-root", *BASE)[0] == 0  # the option exists
    finally:
        path.unlink()


def test_a_one_megabyte_question_is_refused_quickly(tiny, tmp_path, capsys):
    _, ckpt, _, data = tiny
    row = rows_of(data, 1)[0]
    row["conversations"][0]["value"] = "<image>\n" + "word " * 200_000
    path = write_rows(data.parent / f"long_{tmp_path.name}.jsonl", [row])
    try:
        started = time.perf_counter()
        code, _, err = eval_cli(capsys, ckpt, "--data", path, *BASE)
        assert code == 2 and f"{path}[0]: the prompt is" in err and "max_position_embeddings=4096" in err
        assert time.perf_counter() - started < 120
    finally:
        path.unlink()


# -- unclear rows: options ---------------------------------------------------------------------------


@pytest.mark.parametrize("args,named", [
    (["--metric", "bleu"], "--metric 'bleu' is not a metric (known: anls"),
    (["--image-root", "/nonexistent"], "--image-root /nonexistent: not found"),
    (["--configs", " "], "names no configuration; a configuration is comma-separated"),
    (["--configs", ";"], "names no configuration; a configuration is comma-separated"),
    (["--configs", "ALL"], "--configs 'ALL': 'ALL' is not a layer number; a configuration is comma-separated"),
    (["--configs", "abc"], "'abc' is not a layer number; a configuration is comma-separated self-attention layers"),
    (["--configs", "1.5"], "'1.5' is not a layer number; a configuration is comma-separated"),
    (["--token-reduction", '{"method": "visionzip", "keep": 100000}'],
     "--token-reduction visionzip(keep=100000) does not fit the data"),
    (["--data", "docvqa_val={tmp}"], "--data docvqa_val={tmp}: {tmp} is not a folder written by Dataset.save_to_disk"),
])
def test_bad_options_exit_2_naming_the_option(tiny, tmp_path, capsys, args, named):
    _, ckpt, _, data = tiny
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = eval_cli(capsys, ckpt, "--data", data, "--limit", "1", *BASE, *args)
    assert code == 2 and named.replace("{tmp}", str(tmp_path)) in err and out == ""


def test_the_skip_ceiling_is_a_fraction(tiny, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(tiny[1]), "--data", str(tiny[3]), "--max-skip-fraction", "2"])
    assert exit_.value.code == 2 and "--max-skip-fraction: must be between 0 and 1" in capsys.readouterr().err


def test_a_configuration_training_never_sampled_warns(tiny, capsys, caplog):
    _, ckpt, _, data = tiny
    code, out, _ = eval_cli(capsys, ckpt, "--data", data, "--limit", "1", "--no-progress", "--max-new-tokens", "2",
                            "--configs", "none;13")
    assert code == 0 and "none" in out and "13" in out
    warned = [r.getMessage() for r in caplog.records if "is not one of the 13 configurations" in r.getMessage()]
    assert len(warned) == 2 and warned[1].startswith("--configs '13': configuration 13 is not one of")


def test_nothing_evaluated_or_too_many_skipped_exits_non_zero(tiny, tmp_path, capsys):
    _, ckpt, _, data = tiny
    rows = rows_of(data)
    for row in rows[1:]:
        row["image"] = "images/missing.png"
    path = write_rows(data.parent / f"skip_{tmp_path.name}.jsonl", rows)
    try:
        code, out, err = eval_cli(capsys, ckpt, "--data", path, *BASE)
        assert code == 2 and "3 of 4 samples were skipped (75%, more than --max-skip-fraction=0.1)" in err
        assert f"{path}[1]: image" in err
        code, out, err = eval_cli(capsys, ckpt, "--data", path, "--max-skip-fraction", "0.8", *BASE)
        assert code == 0 and "skipped:" in out
        write_rows(path, rows[1:])
        with pytest.raises(EvalIncomplete, match="nothing was evaluated"):
            evaluate(str(ckpt), str(path), configs="1,4", max_new_tokens=2, progress=False, max_skip_fraction=1)
    finally:
        path.unlink()


def test_a_checkpoint_without_a_tokenizer_takes_tokenizer(tiny, tmp_path, capsys):
    _, ckpt, _, data = tiny
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    (bare / "tokenizer.json").unlink()
    code, _, err = eval_cli(capsys, bare, "--data", data, "--limit", "1", *BASE)
    assert code == 2 and "no tokenizer found" in err and "pass --tokenizer" in err
    code, out, _ = eval_cli(capsys, bare, "--data", data, "--limit", "1", "--tokenizer", ckpt / "tokenizer.json", *BASE)
    assert code == 0 and "1,4" in out


# -- unclear rows: predictions files -----------------------------------------------------------------


@pytest.mark.parametrize("line,named", [
    ("1", "line 2 holds a int, not a predictions record"),
    ('{"sample": "data/0", "configuration": "1,4"}', "line 2 is not a predictions record (no prediction, score)"),
    ("{not json", "line 2 is not JSON"),
])
def test_a_bad_predictions_line_names_the_file_and_line(tiny, tmp_path, capsys, line, named):
    _, ckpt, _, data = tiny
    cache = tmp_path / "p.jsonl"
    args = [ckpt, "--data", data, "--limit", "1", "--predictions", cache, *BASE]
    assert eval_cli(capsys, *args)[0] == 0
    cache.write_text(cache.read_text() + line + "\n")
    code, _, err = eval_cli(capsys, *args)
    assert code == 2 and f"--predictions {cache}: {named}" in err


def test_load_errors_are_data_errors_before_the_model(tiny, tmp_path):
    """The same checks hold through the Python API, before a model is loaded."""
    with pytest.raises(DataError, match="--metric 'bleu'"):
        evaluate("no-such-model", str(tiny[3]), metric="bleu", progress=False)
    with pytest.raises(DataError, match="--image-root /nonexistent: not found"):
        evaluate("no-such-model", str(tiny[3]), image_root="/nonexistent", progress=False)
    with pytest.raises(DataError, match="is the data file"):
        evaluate("no-such-model", str(tiny[3]), predictions=tiny[3], progress=False)
