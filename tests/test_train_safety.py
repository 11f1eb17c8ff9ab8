"""Training run safety and bad training input: every case is refused with a clear error naming the
key, file or sample, or gives the right result (issue 8's catalogue, training part)."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from test_train import params, synth, write_recipe  # noqa: F401 - the synthetic-data fixture

from visorlib.config import ConfigError
from visorlib.models import InputError
from visorlib.processing.files import open_image
from visorlib.train import DataError, RunDirError, Trainer, load_recipe, make_synthetic_dataset


def edit_recipe(path: Path, section: str, key: str, value) -> Path:
    data = yaml.safe_load(path.read_text())
    data[section][key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` (what a decompression bomb looks like to PIL's open)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def dataset_with(tmp_path: Path, synth: Path, images: dict[int, str], rows: int = 12) -> Path:  # noqa: F811
    """A copy of the synthetic data whose rows ``images`` keys point at other image paths."""
    lines = [json.loads(line) for line in (synth / "data.jsonl").read_text().splitlines()][:rows]
    for index, image in images.items():
        lines[index]["image"] = image
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines))
    return path


# ----------------------------------------------------------------------------- recipe validation
BAD_VALUES = [
    ("training", "global_batch_size", 0, "training.global_batch_size"),
    ("data", "micro_batch_size", 0, "data.micro_batch_size"),
    ("training", "max_steps", -1, "training.max_steps"),
    ("checkpoint", "every_steps", 0, "checkpoint.every_steps"),
    ("logging", "every_steps", 0, "logging.every_steps"),
    ("optim", "grad_clip", -1.0, "optim.grad_clip"),
    ("optim", "min_lr_ratio", 50, "optim.min_lr_ratio"),
    ("optim", "betas", [0.9], "optim.betas"),
    ("optim", "betas", [0.9, 1.0], "optim.betas"),
    ("optim", "lr", "fast", "optim.lr"),
    ("optim", "lr", 0, "optim.lr"),
    ("data", "max_skip_fraction", 1.5, "data.max_skip_fraction"),
    ("data", "num_workers", -1, "data.num_workers"),
    ("data", "prefetch_factor", 2, "data.prefetch_factor"),  # needs workers
    ("training", "threads", 0, "training.threads"),
    ("data", "max_pixels", 0, "data.max_pixels"),
]


@pytest.mark.parametrize("section, key, value, named", BAD_VALUES, ids=[f"{c[3]}={c[2]}" for c in BAD_VALUES])
def test_bad_recipe_values_are_refused_at_load(tmp_path, synth, section, key, value, named):  # noqa: F811
    path = edit_recipe(write_recipe(tmp_path, synth), section, key, value)
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert str(path) in message and named in message and "must be" in message
    if key == "lr" and isinstance(value, str):
        assert "1.0e-3" in message  # says how to write it


def test_numbers_written_like_1e_3_are_floats(tmp_path, synth):  # noqa: F811
    path = write_recipe(tmp_path, synth)
    path.write_text(path.read_text().replace("lr: 0.003", "lr: 1e-3"))
    assert "lr: 1e-3" in path.read_text()  # YAML 1.1 reads this as the string '1e-3'
    recipe = load_recipe(path)
    assert recipe.optim.lr == 1e-3 and isinstance(recipe.optim.lr, float)
    assert load_recipe(path, ["optim.grad_clip=null"]).optim.grad_clip is None


@pytest.mark.parametrize("override", ["training.max_steps=!!python/object/apply:os.system ['true']",
                                      "training.max_steps=[1, 2", "=3", "training..seed=1", "no-equals-sign"])
def test_bad_overrides_are_config_errors(tmp_path, synth, override):  # noqa: F811
    with pytest.raises(ConfigError, match="override"):
        load_recipe(write_recipe(tmp_path, synth), [override])


def test_cli_bad_override_is_one_line(tmp_path, synth, capsys):  # noqa: F811
    from visorlib.cli import main

    assert main(["train", str(write_recipe(tmp_path, synth)), "--set", "optim.lr=!!python/name:os.system"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("visorlib: error: override") and "Traceback" not in err
    from visorlib.cli import build_parser

    assert build_parser().parse_args(["train", "r.yaml", "--resume", "--allow-recipe-change"]).allow_recipe_change


def test_synthetic_data_refuses_non_positive_counts(tmp_path, synth):  # noqa: F811
    from visorlib import get_config

    with pytest.raises(ValueError, match="samples must be an integer >= 1, got -3"):
        make_synthetic_dataset(tmp_path / "s", get_config("visor-llava-ov-0.5b").tiny(), samples=-3)


def test_recipe_paths_are_relative_to_the_recipe_file(tmp_path, synth, monkeypatch):  # noqa: F811
    folder = tmp_path / "recipes"
    folder.mkdir()
    path = write_recipe(folder, synth)
    data = yaml.safe_load(path.read_text())
    data["data"]["datasets"] = [{"path": os.path.relpath(synth, folder), "format": "synthetic"}]
    data["data"]["tokenizer"] = os.path.relpath(synth, folder)
    data["checkpoint"]["dir"], data["logging"]["metrics_file"] = "../runs/a", "../runs/a/metrics.jsonl"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.chdir("/")  # the command's directory does not matter
    recipe = load_recipe(path, [f"logging.metrics_file={tmp_path / 'm.jsonl'}"])
    assert Path(recipe.data.datasets[0].path).resolve() == synth.resolve()
    assert Path(recipe.data.tokenizer).resolve() == synth.resolve()
    assert Path(recipe.checkpoint.dir).resolve() == (tmp_path / "runs" / "a").resolve()
    assert recipe.logging.metrics_file == str(tmp_path / "m.jsonl")  # command-line paths: as given
    assert len(Trainer(recipe).datasets[0]) == 36


def test_shipped_tiny_recipe_points_at_the_repository_data():
    repo = Path(__file__).parent.parent
    recipe = load_recipe(repo / "recipes" / "tiny-cpu-synthetic.yaml")
    assert Path(recipe.data.datasets[0].path).resolve() == (repo / "data" / "synth").resolve()
    assert Path(recipe.checkpoint.dir).resolve() == (repo / "checkpoints" / "tiny-cpu-synthetic").resolve()


# ----------------------------------------------------------------------------- run safety
def test_a_second_training_into_the_same_folder_is_refused(tmp_path, synth):  # noqa: F811
    path = write_recipe(tmp_path, synth)
    first = Trainer(load_recipe(path))
    step, refused = first.train_step, []

    def step_with_intruder(items=None):
        metrics = step(items)
        if metrics["step"] == 1:
            with pytest.raises(RunDirError, match=rf"in use by another training \(pid {os.getpid()} on host"):
                Trainer(load_recipe(path))
            refused.append(True)
        return metrics

    first.train_step = step_with_intruder
    old = os.umask(0o022)
    try:
        logs = first.train()
    finally:
        os.umask(old)
    assert refused and len(logs) == 4  # the first run was not disturbed
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    latest = first.latest_checkpoint()
    assert latest.name == "step_00000004" and (latest / ".metadata").exists()
    for name in ("trainer.json", "model/model.safetensors", "model/visorlib.json"):
        assert (latest / name).stat().st_mode & 0o777 == 0o644, name  # readable exports, not tempfile's 0600
    assert json.loads((latest / "trainer.json").read_text())["recipe"]["optim"]["lr"] == 3e-3
    Trainer(load_recipe(path), resume=True)  # released after training (a fresh run would be refused: issue 17)


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path, synth, caplog):  # noqa: F811
    path = write_recipe(tmp_path, synth)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from visorlib.data.runlock import RunLock; "
         "lock = RunLock(sys.argv[1], 'test holder'); lock.acquire(); print('locked', flush=True); time.sleep(120)",
         str(tmp_path / "ckpt")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"pid {holder.pid} on host .*test holder"):
            Trainer(load_recipe(path))
    finally:
        holder.kill()  # SIGKILL: no chance to release; the kernel drops the flock
        holder.wait(timeout=30)
    with caplog.at_level(logging.WARNING, logger="visorlib.train"):
        trainer = Trainer(load_recipe(path))
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert len(trainer.train(max_steps=1)) == 1


@pytest.mark.parametrize("key", ["checkpoint.dir", "logging.metrics_file"])
def test_unwritable_output_is_refused_before_the_model_is_built(tmp_path, synth, monkeypatch, key):  # noqa: F811
    (tmp_path / "a-file").write_text("")  # a folder below a regular file cannot be created, even by root
    section, name = key.split(".")
    path = edit_recipe(write_recipe(tmp_path, synth), section, name, str(tmp_path / "a-file" / "out" / "x"))

    def no_build(*args):
        raise AssertionError("the model was built before the output folder was checked")

    monkeypatch.setattr("visorlib.train.trainer.build_model", no_build)
    with pytest.raises(RunDirError, match=rf"recipe\.yaml: {key.split('.')[0]}.*a-file/out.* is not a writable folder"):
        Trainer(load_recipe(path))


def test_resume_checks_the_recipe_and_does_not_duplicate_metrics(tmp_path, synth, caplog):  # noqa: F811
    path = write_recipe(tmp_path, synth)
    first = Trainer(load_recipe(path))
    first.train(max_steps=2)  # checkpoint at step 2
    first._log(first.train_step(), None)  # step 3 is logged, then the run is killed before saving it
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "lo')  # ... in the middle of writing step 4's line
    fake = tmp_path / "ckpt" / "step_00000009"
    fake.mkdir()
    (fake / "trainer.json").write_text("{}")  # no DCP metadata: not a checkpoint

    with pytest.raises(ConfigError, match=r"recipe\.yaml: the recipe differs .*optim\.lr: 0\.003 -> 0\.01.*"
                                          r"--allow-recipe-change"):
        Trainer(load_recipe(path, ["optim.lr=0.01", "training.max_steps=4"]), resume=True)
    with caplog.at_level(logging.WARNING, logger="visorlib.train"):
        changed = Trainer(load_recipe(path, ["optim.lr=0.01"]), resume=True, allow_recipe_change=True)
    assert changed.step == 2 and "optim.lr" in caplog.text
    changed.close()

    resumed = Trainer(load_recipe(path, ["training.max_steps=4", "logging.progress=false"]), resume=True)
    assert resumed.step == 2 and resumed.latest_checkpoint().name == "step_00000002"
    resumed.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- image files
def call_with_timeout(function, seconds: float = 20.0):
    """Run ``function`` in a daemon thread; a hang fails the test instead of freezing it."""
    result: dict = {}

    def target():
        try:
            result["value"] = function()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "hung"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_special_files_are_refused_without_opening_them(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(InputError, match=r"pipe\.png is a FIFO \(named pipe\), not a regular file"):
        call_with_timeout(lambda: open_image("pipe.png", root=tmp_path))
    with pytest.raises(InputError, match=r"/dev/null is a character device"):
        call_with_timeout(lambda: open_image("/dev/null"))
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        open_image(tmp_path / "folder.png")


def test_image_paths_stay_inside_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8), "red").save(outside / "x.png")
    (root / "link.png").symlink_to(outside / "x.png")
    for path in ("../elsewhere/x.png", str(outside / "x.png"), "link.png"):
        with pytest.raises(InputError, match="outside the image root .*allow_outside_image_root"):
            open_image(path, root=root)
    assert open_image("../elsewhere/x.png", root=root, allow_outside=True).size == (8, 8)
    assert open_image("link.png", root=root, allow_outside=True).size == (8, 8)


def test_bombs_and_broken_files_name_the_file(tmp_path, monkeypatch):
    # 12000^2 only makes PIL warn (and then take 2.7 GB); max_pixels refuses it before decoding.
    bomb = png_header_only(tmp_path / "bomb.png", 12000, 12000)
    with pytest.raises(InputError, match=r"bomb\.png has 12000x12000 = 144,000,000 pixels, more than max_pixels"):
        open_image(bomb)
    huge = png_header_only(tmp_path / "huge.png", 15000, 15000)
    with pytest.raises(InputError, match=r"huge\.png is too large to decode safely"):
        open_image(huge, max_pixels=None)  # PIL's own guard (over twice Image.MAX_IMAGE_PIXELS)
    Image.new("RGB", (100, 100), "blue").save(tmp_path / "ok.png")
    with pytest.raises(InputError, match="max_pixels=1,000"):
        open_image(tmp_path / "ok.png", max_pixels=1000)
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    noise.save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.png is corrupt or unreadable \(truncated\?\)"):
        open_image(tmp_path / "cut.png")
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it on import
    with pytest.raises(InputError, match=r"cut\.png is corrupt or unreadable \(truncated\?\)"):
        open_image(tmp_path / "cut.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    with pytest.raises(InputError, match=r"missing\.png not found"):
        open_image("missing.png", root=tmp_path)


def test_bad_image_files_are_skippable_data_errors(tmp_path, synth):  # noqa: F811
    png_header_only(synth / "images" / "bomb.png", 15000, 15000)
    os.mkfifo(tmp_path / "pipe.png")
    rows = dataset_with(tmp_path, synth, {0: "images/bomb.png", 1: "../pipe.png", 2: str(tmp_path / "pipe.png")})
    path = write_recipe(tmp_path, synth, data={"datasets": [{"path": str(rows), "image_root": str(synth)}]})
    dataset = Trainer(load_recipe(path)).datasets[0]
    sample, skipped = call_with_timeout(lambda: dataset.fetch(0))
    assert sample["index"] == 3 and [i for i, _ in skipped] == [0, 1, 2]
    assert "rows.jsonl[0]" in skipped[0][1] and "bomb.png is too large to decode safely" in skipped[0][1]
    assert "rows.jsonl[1]" in skipped[1][1] and "outside the image root" in skipped[1][1]
    allowed = Trainer(load_recipe(path, ["data.allow_outside_image_root=true", "data.on_error=raise"]))
    with pytest.raises(DataError, match=r"rows\.jsonl\[2\]: image .*pipe\.png is a FIFO"):
        call_with_timeout(lambda: allowed.datasets[0].encode(2))


def test_too_many_broken_samples_stop_training(tmp_path, synth):  # noqa: F811
    rows = dataset_with(tmp_path, synth, {i: "images/missing.png" for i in range(0, 12, 2)})
    path = write_recipe(tmp_path, synth, data={"datasets": [{"path": str(rows), "image_root": str(synth)}],
                                               "skip_check_after": 4})
    trainer = Trainer(load_recipe(path))
    with pytest.raises(DataError, match=r"of the \d+ samples read so far are broken .*max_skip_fraction=0\.1.*"
                                        r"missing\.png not found"):
        trainer.train()
    assert trainer.step == 0  # stopped before training on a skewed batch
    relaxed = Trainer(load_recipe(path, ["data.max_skip_fraction=0.6", f"checkpoint.dir={tmp_path / 'c2'}"]))
    assert len(relaxed.train(max_steps=1)) == 1
    everything = dataset_with(tmp_path, synth, {i: "nowhere/x.png" for i in range(12)})
    wrong_root = Trainer(load_recipe(path, [f"data.datasets=[{{path: {everything}, image_root: {synth}}}]",
                                            f"checkpoint.dir={tmp_path / 'c3'}"]))
    with pytest.raises(DataError, match=r"5 consecutive samples from index \d+ are broken"):
        wrong_root.datasets[0][0]


def test_data_loader_workers_give_the_same_training(tmp_path, synth):  # noqa: F811
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    inline = Trainer(load_recipe(write_recipe(tmp_path / "a", synth, training={"max_steps": 3})))
    expected = inline.train()
    path = write_recipe(tmp_path / "b", synth, training={"max_steps": 3}, data={"num_workers": 2, "prefetch_factor": 2})
    workers = Trainer(load_recipe(path))
    logs = workers.train(max_steps=2)  # checkpoint at 2, then "killed"
    resumed = Trainer(load_recipe(path), resume=True)
    logs += resumed.train()
    assert [m["loss"] for m in logs] == [m["loss"] for m in expected]
    assert [m["grad_norm"] for m in logs] == [m["grad_norm"] for m in expected]
    a, b = params(inline), params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
