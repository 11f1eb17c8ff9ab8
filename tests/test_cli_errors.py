"""Every ``visorlib`` subcommand, given bad arguments, fails with one line and no traceback.

The rule (visorlib/cli.py): exit status 2, a single ``visorlib: error: ...`` line on stderr that
names the bad value, and nothing expensive done first (no model built before an output path or an
image is found to be unusable).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from visor_helpers import word_tokenizer

import visorlib
from visorlib.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad inputs shared by the cases: a truncated JPEG, a FIFO, broken checkpoints, bad recipes."""
    root = tmp_path_factory.mktemp("bad")
    good = root / "good.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    Image.new("RGB", (300, 200), (10, 200, 10)).save(root / "full.jpg", quality=95)
    data = (root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    os.mkfifo(root / "pipe.png")
    (root / "a_dir").mkdir()
    # A loadable tiny checkpoint, then copies broken in one way each.
    torch.manual_seed(0)
    cfg = visorlib.get_config("llava-ov-0.5b").tiny()
    ckpt = root / "ckpt"
    visorlib.zoo.instantiate(cfg).eval().save_pretrained(ckpt)
    word_tokenizer(ckpt, cfg)
    for name, edit in {
        "ckpt_v99": lambda f: _edit_json(f / "visorlib.json", version=99),
        "ckpt_badtok": lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "model": {'),
        "ckpt_notok": lambda f: (f / "tokenizer.json").unlink(),
    }.items():
        copy = root / name
        copy.mkdir()
        for file in ckpt.iterdir():
            (copy / file.name).write_bytes(file.read_bytes())
        edit(copy)
    recipe = yaml.safe_load((REPO / "recipes" / "tiny-cpu-synthetic.yaml").read_text())
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (root / "broken.yaml").write_text("model: {name: visor-llava-ov-0.5b\ndata: [\n")
    (root / "plain.txt").write_text("not a folder")
    from visorlib.train.synth import make_synthetic_dataset

    make_synthetic_dataset(root / "synth", cfg, samples=1, image_size=60)
    return root


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _gen(model, *extra):
    return ["generate", "--model", model, "--prompt", "what is this ?", "--max-new-tokens", "2", *extra]


# (id, argv with {root} for the fixture folder, substrings the error line must hold)
CASES = [
    ("list-bad-flag", ["list", "--bogus"], ["unrecognized arguments: --bogus"]),
    ("info-unknown", ["info", "llava-ov-9b"], ["unknown model 'llava-ov-9b'"]),
    ("info-missing-name", ["info"], ["the following arguments are required: name"]),
    ("generate-missing-image", _gen("{root}/ckpt", "--image", "{root}/absent.png"), ["absent.png", "not found"]),
    ("generate-truncated-jpeg", _gen("{root}/ckpt", "--image", "{root}/truncated.jpg"), ["truncated.jpg"]),
    ("generate-fifo", _gen("{root}/ckpt", "--image", "{root}/pipe.png"), ["pipe.png", "FIFO"]),
    ("generate-image-is-dir", _gen("{root}/ckpt", "--image", "{root}/a_dir"), ["a_dir", "directory"]),
    ("generate-no-model", _gen("{root}/nowhere", "--image", "{root}/good.png"), ["nowhere"]),
    ("generate-newer-format", _gen("{root}/ckpt_v99"), ["ckpt_v99/visorlib.json", "version 99", "upgrade"]),
    ("generate-corrupt-tokenizer", _gen("{root}/ckpt_badtok"), ["ckpt_badtok/tokenizer.json", "not a valid"]),
    ("generate-no-tokenizer", _gen("{root}/ckpt_notok"), ["ckpt_notok", "no tokenizer"]),
    ("generate-zero-tokens", ["generate", "--model", "{root}/ckpt", "--prompt", "x", "--max-new-tokens", "0"],
     ["--max-new-tokens", "must be positive, got 0"]),
    ("generate-bad-device", _gen("{root}/ckpt", "--device", "gpu9"), ["--device 'gpu9'"]),
    ("profile-unknown", ["profile", "llava-ov-9b", "--tiny"], ["unknown model 'llava-ov-9b'"]),
    ("profile-json-folder-missing", ["profile", "llava-ov-0.5b", "--json", "/nonexistent/x.json"],
     ["--json /nonexistent/x.json", "does not exist"]),
    ("profile-json-is-dir", ["profile", "llava-ov-0.5b", "--tiny", "--json", "{root}/a_dir"], ["a_dir", "directory"]),
    ("profile-plot-folder-missing", ["profile", "llava-ov-0.5b", "--plot", "/nonexistent/p.png"], ["--plot"]),
    ("profile-truncated-jpeg", ["profile", "llava-ov-0.5b", "--tiny", "--image", "{root}/truncated.jpg"],
     ["truncated.jpg", "corrupt"]),
    ("profile-repeats-zero", ["profile", "llava-ov-0.5b", "--repeats", "0"], ["--repeats", "must be positive"]),
    ("profile-threads-text", ["profile", "llava-ov-0.5b", "--threads", "many"], ["--threads", "'many' is not an integer"]),
    ("train-missing-recipe", ["train", "{root}/absent.yaml"], ["absent.yaml"]),
    ("train-malformed-yaml", ["train", "{root}/broken.yaml"], ["broken.yaml"]),
    ("train-set-yaml-tag", ["train", "{root}/recipe.yaml", "--set", "training.max_steps=!!python/object/apply:os.getpid []"],
     ["training.max_steps"]),
    ("train-set-malformed", ["train", "{root}/recipe.yaml", "--set", "training.max_steps=[1,"], ["training.max_steps"]),
    ("train-set-unknown-key", ["train", "{root}/recipe.yaml", "--set", "training.bogus=3"], ["bogus"]),
    ("synth-negative", ["data", "synth", "{root}/out", "--samples", "-3"], ["--samples", "must be positive, got -3"]),
    ("synth-zero-size", ["data", "synth", "{root}/out", "--image-size", "0"], ["--image-size", "must be >= 32, got 0"]),
    ("synth-out-is-file", ["data", "synth", "{root}/plain.txt", "--samples", "1"], ["plain.txt", "not a folder"]),
    ("synth-unknown-card", ["data", "synth", "{root}/out", "--model", "nope"], ["unknown model 'nope'"]),
    ("data-no-subcommand", ["data"], ["required: data_command"]),
]


def subcommands(parser=None, prefix=()) -> list[tuple[str, ...]]:
    """Every (nested) subcommand of the ``visorlib`` parser, e.g. ``("data", "synth")``."""
    import argparse

    from visorlib.cli import build_parser

    parser = parser or build_parser()
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = subcommands(sub, (*prefix, name))
                found += nested or [(*prefix, name)]
    return found


COMMANDS = subcommands()
_EVAL = ["eval", "{root}/ckpt", "--data", "{root}/synth/data.jsonl"]
if ("eval",) in COMMANDS:
    CASES += [
        ("eval-unknown-model", ["eval", "llava-ov-9b", "--data", "{root}/synth/data.jsonl"], ["llava-ov-9b"]),
        ("eval-missing-data", ["eval", "{root}/ckpt", "--data", "{root}/absent.jsonl"], ["absent.jsonl"]),
        ("eval-json-folder-missing", [*_EVAL, "--json", "/nonexistent/e.json"], ["--json /nonexistent/e.json"]),
        ("eval-batch-size-zero", [*_EVAL, "--batch-size", "0"], ["batch", "0"]),
    ]
_ANALYZE = ["analyze", "{root}/ckpt", "--data", "{root}/synth/data.jsonl", "--out", "{root}/analysis"]
if ("analyze",) in COMMANDS:
    CASES += [
        ("analyze-missing-data", ["analyze", "{root}/ckpt", "--data", "{root}/absent.jsonl"], ["absent.jsonl"]),
        ("analyze-out-is-file", [*_ANALYZE[:-1], "{root}/plain.txt"], ["plain.txt", "is a file"]),
        ("analyze-bad-sa-layers", [*_ANALYZE, "--sa-layers", "1,x"], ["--sa-layers '1,x'"]),
        ("analyze-dense-sa-layers", [*_ANALYZE, "--sa-layers", "1", "--drop-subsets", "0"], ["dense model"]),
    ]
if ("data", "synthdoc") in COMMANDS:
    CASES += [
        ("synthdoc-negative", ["data", "synthdoc", "{root}/out", "--pages", "-3"], ["--pages", "-3"]),
        ("synthdoc-task", ["data", "synthdoc", "{root}/out", "--task", "nope"], ["--task", "nope"]),
        ("synthdoc-eval-pages", ["data", "synthdoc", "{root}/out", "--eval-pages", "-1"], ["--eval-pages", "-1"]),
    ]
if ("serve",) in COMMANDS:
    CASES += [
        ("serve-zero-batch", ["serve", "visor-synthdoc-tiny", "--max-batch", "0"], ["--max-batch", "must be positive"]),
        ("serve-media-root-missing", ["serve", "visor-synthdoc-tiny", "--media-root", "{root}/absent"],
         ["--media-root", "absent"]),
        ("serve-remote-without-host", ["serve", "visor-synthdoc-tiny", "--allow-remote-media"], ["--remote-host"]),
    ]
if ("demo",) in COMMANDS:
    CASES += [
        ("demo-json-folder-missing", ["demo", "--json", "/nonexistent/d.json"], ["--json /nonexistent/d.json"]),
        ("demo-zero-pages", ["demo", "--pages", "0"], ["--pages"]),
    ]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_subcommand_rejects_an_unknown_flag_in_one_line(command, capsys):
    code, captured = _run([*command, "--no-such-flag"], capsys)
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("visorlib: error: "), captured.err


def test_the_catalogue_covers_every_subcommand():
    covered = {tuple(a for a in argv[:2] if not a.startswith(("-", "{"))) for _, argv, _ in CASES}
    missing = [c for c in COMMANDS if not any(k[: len(c)] == c for k in covered)]
    assert not missing, f"add bad-argument cases for {missing}"


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse exits for usage errors
        code = exit_.code
    return code, capsys.readouterr()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_arguments_fail_with_one_line(case, files, capsys, monkeypatch):
    _, argv, expected = case
    monkeypatch.chdir(files)  # relative outputs of a command that wrongly succeeded land in tmp
    started = time.perf_counter()
    code, captured = _run([a.replace("{root}", str(files)) for a in argv], capsys)
    elapsed = time.perf_counter() - started
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (code, captured.err)
    assert len(lines) == 1 and lines[0].startswith("visorlib: error: "), captured.err
    assert "Traceback" not in captured.err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    # Nothing was built first: real-size profile cases would take minutes if the check came last.
    assert elapsed < 60, elapsed
    assert not (files / "out").exists()


def test_a_card_override_with_zero_heads_is_named(tmp_path, monkeypatch, capsys):
    card = yaml.safe_load((visorlib.zoo.zoo_dir() / "llava-ov-0.5b.yaml").read_text())
    card["name"] = "zero-heads"
    card["decoder"]["num_heads"] = 0
    (tmp_path / "zero-heads.yaml").write_text(yaml.safe_dump(card))
    monkeypatch.setenv("VISORLIB_ZOO", str(tmp_path))
    visorlib.zoo._cards.cache_clear()
    try:
        code, captured = _run(["info", "zero-heads"], capsys)
    finally:
        visorlib.zoo._cards.cache_clear()
    assert code == 2
    assert "zero-heads.yaml" in captured.err and "decoder.num_heads must be positive, got 0" in captured.err


def test_the_installed_command_prints_one_line(files):
    """The real process: the entry point itself, not only main(), keeps tracebacks away."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv in (["data", "synth", str(files / "o"), "--samples", "-3"],
                 ["generate", "--model", str(files / "ckpt_badtok"), "--prompt", "x"]):
        done = subprocess.run([sys.executable, "-m", "visorlib.cli", *argv], capture_output=True, text=True, env=env,
                              timeout=120)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr and done.stderr.count("visorlib: error:") == 1, done.stderr
        assert not (files / "o").exists()


def test_jsonl_errors_name_the_line_in_the_file(tmp_path):
    from visorlib.data.conversations import DataError, read_rows

    path = tmp_path / "data.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2, "text": "a\u2028b"}\n{"id": 3,\n')
    with pytest.raises(DataError, match=r"data\.jsonl: line 4 is not valid JSON"):
        read_rows(path)
    path.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2 must hold a JSON object, got list"):
        read_rows(path)
    path.write_text('{"id": 1}\n\n{"id": 2, "text": "a\u2028b"}\n')
    assert [row["id"] for row in read_rows(path)] == [1, 2]
