"""Issue 17's second bad-input catalogue, the part outside ``visorlib eval``: every case gives a
clear error naming the key, file or sample (or the right result), and nothing a user wrote is lost.

Recipe cases stop at ``load_recipe`` (before any model is built); run cases share one tiny
two-step training, copied per test, so each case takes seconds.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from test_train import synth, write_recipe  # noqa: F401 - the synthetic-data fixture

import visorlib
from visorlib.cli import main
from visorlib.config import ConfigError
from visorlib.hub import CheckpointError
from visorlib.models import InputError
from visorlib.processing.files import open_image
from visorlib.train import RunDirError, Trainer, load_recipe, make_synthetic_dataset
from visorlib.visor.reduction import ReductionSpecError, parse_reduction

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> str:
    """The command's error: exactly one ``visorlib: error:`` line, no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("visorlib: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ----------------------------------------------------------------------------- recipes, at load
def _recipe_with(tmp_path, synth, edit) -> Path:  # noqa: F811
    path = write_recipe(tmp_path, synth)
    data = yaml.safe_load(path.read_text())
    edit(data, tmp_path)
    path.write_text(yaml.safe_dump(data))
    return path


def _dataset_is_folder(data, tmp):
    (tmp / "rows").mkdir()
    data["data"]["datasets"] = [{"path": str(tmp / "rows"), "format": "llava_json"}]


def _metrics_is_folder(data, tmp):
    (tmp / "metrics").mkdir()
    data["logging"]["metrics_file"] = str(tmp / "metrics")


def _configuration_out_of_range(data, tmp):
    data["training"].update(mode="independent", configuration=[0, 99])


RECIPE_CASES = [
    ("dataset-path-is-folder", _dataset_is_folder, [], ["data.datasets[0].path", "is a folder"]),
    ("metrics-file-is-folder", _metrics_is_folder, [], ["logging.metrics_file", "is a folder"]),
    ("seed-2**70-text", None, ["training.seed=2**70"], ["training.seed"]),
    ("seed-too-large", None, [f"training.seed={2**70}"], ["training.seed", "2**63"]),
    ("seed-negative", None, ["training.seed=-1"], ["training.seed"]),
    ("configuration-not-in-plan", _configuration_out_of_range, [], ["training.configuration", "[99]"]),
    ("configuration-by-override", None, ["training.mode=independent", "training.configuration=[0,99]"],
     ["training.configuration", "[99]"]),
]


@pytest.mark.parametrize("case", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe_is_refused_at_load_naming_the_key(case, tmp_path, synth, monkeypatch):  # noqa: F811
    _, edit, overrides, expected = case
    path = _recipe_with(tmp_path, synth, edit) if edit else write_recipe(tmp_path, synth)
    monkeypatch.setattr("visorlib.zoo.instantiate", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ConfigError) as caught:
        load_recipe(path, overrides)
    message = str(caught.value)
    assert "recipe.yaml" in message or "override" in message, message
    for text in expected:
        assert text in message, (text, message)


def test_a_valid_configuration_still_loads(tmp_path, synth):  # noqa: F811
    path = write_recipe(tmp_path, synth)
    recipe = load_recipe(path, ["training.mode=independent", "training.configuration=[1,4]"])
    assert recipe.training.configuration == [1, 4]


def test_a_duplicate_yaml_key_is_an_error_naming_key_and_file(tmp_path, synth):  # noqa: F811
    path = write_recipe(tmp_path, synth)
    path.write_text(path.read_text() + "optim:\n  lr: 0.5\n")  # a second optim: section, appended
    with pytest.raises(ConfigError, match=r"recipe\.yaml: .*duplicate key 'optim' on line \d+ \(first on line \d+\)"):
        load_recipe(path)
    nested = write_recipe(tmp_path, synth)
    nested.write_text(nested.read_text().replace("  lr: 0.003\n", "  lr: 0.003\n  lr: 0.5\n"))
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_recipe(nested)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):  # an override value is read the same way
        load_recipe(write_recipe(tmp_path, synth), ["model.overrides={a: 1, a: 2}"])


# ----------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth):  # noqa: F811
    """A run folder holding a complete step-2 checkpoint (copied per test, never changed)."""
    root = tmp_path_factory.mktemp("run")
    path = write_recipe(root, synth, training={"max_steps": 2})
    trainer = Trainer(load_recipe(path))
    trainer.train()
    trainer.close()
    assert (root / "ckpt" / "latest").read_text() == "step_00000002"
    return root


def copy_run(trained, tmp_path) -> Path:
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_a_fresh_run_does_not_bury_an_earlier_runs_checkpoints(trained, tmp_path, synth, monkeypatch):  # noqa: F811
    ckpt = copy_run(trained, tmp_path)
    before = snapshot(ckpt)
    monkeypatch.setattr("visorlib.train.trainer.build_model", lambda *a: pytest.fail("model built before the check"))
    with pytest.raises(RunDirError, match=rf"checkpoint\.dir {ckpt} holds an earlier run's checkpoints "
                                          r"\(up to step_00000002\); continue it with --resume"):
        Trainer(load_recipe(write_recipe(tmp_path, synth)))
    assert snapshot(ckpt) == before


def test_resume_past_max_steps_is_an_error_and_equal_is_said(trained, tmp_path, synth, capsys):  # noqa: F811
    copy_run(trained, tmp_path)
    path = write_recipe(tmp_path, synth)
    with pytest.raises(ConfigError, match=r"training\.max_steps=1 but .*step_00000002 is at step 2: nothing to train"):
        Trainer(load_recipe(path, ["training.max_steps=1"]), resume=True)
    code, _, err = run_cli(["train", path, "--resume", "--set", "training.max_steps=1"], capsys)
    assert code == 2 and "training.max_steps=1" in one_error_line(err)
    code, _, err = run_cli(["train", path, "--resume", "--set", "training.max_steps=2"], capsys)
    assert code == 0 and "nothing to train" in err and "at step 2 = training.max_steps" in err


def test_resume_with_another_architecture_is_one_clear_error(trained, tmp_path, synth, capsys):  # noqa: F811
    ckpt = copy_run(trained, tmp_path)
    path = write_recipe(tmp_path, synth)
    changed = ["--set", "model.overrides={decoder: {intermediate_size: 80}}", "--allow-recipe-change"]
    code, _, err = run_cli(["train", path, "--resume", *changed], capsys)
    line = one_error_line(err)
    assert code == 2 and f"{ckpt}/step_00000002 does not fit the model built from" in line, line
    assert "architecture differs" in line
    with pytest.raises(CheckpointError):  # a RuntimeError: the Python API gets the same clear error
        Trainer(load_recipe(path, [changed[1]]), resume=True, allow_recipe_change=True)


def test_disk_full_at_a_save_is_one_line_and_leaves_the_previous_checkpoint(trained, tmp_path, synth,  # noqa: F811
                                                                            monkeypatch):
    ckpt = copy_run(trained, tmp_path)
    before = snapshot(ckpt)
    trainer = Trainer(load_recipe(write_recipe(tmp_path, synth)), resume=True)
    trainer.train_step()

    def full_disk(*args, **kwargs):
        (ckpt / ".tmp_step_00000003" / "__0_0.distcp").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("torch.distributed.checkpoint.filesystem._write_item", full_disk)
    with pytest.raises(RunDirError) as caught:
        trainer.save_checkpoint()
    message = str(caught.value)
    assert message.startswith("no space left on device while saving step 3 into checkpoint.dir " + str(ckpt))
    assert "\n" not in message
    assert not list(ckpt.glob(".tmp_step_*"))  # the partial save no longer fills the disk
    assert snapshot(ckpt) == before  # step_2 and latest untouched
    trainer.close()


def test_ctrl_c_saves_the_step_and_says_how_to_resume(tmp_path, synth):  # noqa: F811
    path = write_recipe(tmp_path, synth, checkpoint={"every_steps": 100})
    script = (
        "import os, signal, sys\n"
        "import visorlib.train.trainer as t\n"
        "step = t.Trainer.train_step\n"
        "def interrupted(self, items=None):\n"
        "    metrics = step(self, items)\n"
        "    if self.step == 1:\n"
        "        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of training\n"
        "    return metrics\n"
        "t.Trainer.train_step = interrupted\n"
        "from visorlib.cli import main\n"
        f"sys.exit(main(['train', {str(path)!r}]))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    line = one_error_line(done.stderr)
    assert done.returncode == 130, done.stderr
    assert f"interrupted at step 1; checkpoint step 1 in {tmp_path / 'ckpt'}" in line, line
    assert f"continue with: visorlib train {path} --resume" in line, line
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000001"
    resumed = Trainer(load_recipe(path), resume=True)
    assert resumed.step == 1
    resumed.close()


# ----------------------------------------------------------------------------- images and generate
def test_an_animated_gif_gives_its_first_frame_to_the_processor(tmp_path):
    frames = [Image.new("RGB", (40, 30), colour) for colour in [(250, 0, 0), (0, 250, 0), (0, 0, 250)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = open_image(tmp_path / "anim.gif")
    assert image.convert("RGB").getpixel((5, 5)) == (250, 0, 0)
    cfg = visorlib.get_config("llava-ov-0.5b").tiny()
    inputs = visorlib.LlavaOnevisionProcessor(cfg)(images=[image])  # failed with "seek of closed file"
    assert inputs["pixel_values"].shape[0] == 1


def test_a_jpeg_with_exif_orientation_6_is_turned_upright(tmp_path):
    stored = Image.new("RGB", (40, 30), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 10, 10))  # a white mark in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display" (a phone held upright)
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    image = open_image(tmp_path / "phone.jpg")
    assert image.size == (30, 40)  # displayed portrait, as transformers' exif_transpose gives
    assert image.getpixel((25, 4))[0] > 200 and image.getpixel((4, 4))[0] < 50  # the mark is now top-right
    assert image.getexif().get(0x0112, 1) == 1


@pytest.fixture(scope="module")
def shipped():
    return visorlib.build("visor-synthdoc-tiny", pretrained=True)


@pytest.mark.parametrize("value", [1.5, True, "4", 0])
def test_generate_refuses_a_max_new_tokens_that_is_not_a_count(shipped, value):
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(InputError, match=rf"max_new_tokens must be an integer >= 1, got {value!r}"):
        shipped.generate(ids, max_new_tokens=value)


def test_generate_counts_the_images_a_prompt_places(tmp_path, capsys):
    page = tmp_path / "page.png"
    Image.new("RGB", (64, 64), (240, 240, 240)).save(page)
    argv = ["generate", "--model", "visor-synthdoc-tiny", "--max-new-tokens", "1"]
    code, _, err = run_cli([*argv, "--image", page, "--prompt", "<image> and <image>: which ?"], capsys)
    line = one_error_line(err)
    assert code == 2 and "--prompt holds 2 <image> placeholder(s) but 1 --image file(s)" in line, line
    code, _, err = run_cli([*argv, "--image", page, "--image", page, "--prompt", "<image> and <image>: which ?"],
                           capsys)
    assert code == 0 and "error" not in err, err  # both images placed where the prompt says


# ----------------------------------------------------------------------------- checkpoints and the zoo
def test_a_checkpoint_with_the_wrong_num_layers_names_file_and_key(shipped, tmp_path):
    shipped.save_pretrained(tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "visorlib.json"
    meta = json.loads(config.read_text())
    layers = meta["config"]["decoder"]["num_layers"]
    meta["config"]["decoder"]["num_layers"] = layers - 2
    config.write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as caught:
        visorlib.from_pretrained(tmp_path / "ckpt")
    message = str(caught.value)
    assert message.startswith(f"{config}: visor.sa_layers"), message
    assert f"its weights hold {layers} decoder layers but decoder.num_layers is {layers - 2}" in message


def test_one_broken_card_does_not_hide_the_others(tmp_path, monkeypatch, capsys):
    zoo = visorlib.zoo.zoo_dir()
    shutil.copy(zoo / "llava-ov-0.5b.yaml", tmp_path)
    card = yaml.safe_load((zoo / "qwen2-vl-2b.yaml").read_text())
    card["decoder"]["num_layerz"] = 4
    (tmp_path / "qwen2-vl-2b.yaml").write_text(yaml.safe_dump(card))
    monkeypatch.setenv("VISORLIB_ZOO", str(tmp_path))
    visorlib.zoo._cards.cache_clear()
    try:
        code, out, err = run_cli(["list"], capsys)
    finally:
        monkeypatch.undo()
        visorlib.zoo._cards.cache_clear()
    assert code == 0 and out.startswith("llava-ov-0.5b ") and "qwen2-vl-2b" not in out
    assert "card 'qwen2-vl-2b' skipped" in err and "qwen2-vl-2b.yaml" in err and "num_layerz" in err, err


# ----------------------------------------------------------------------------- profile and token reduction
def test_pyramiddrop_blames_the_ratio_not_keep():
    with pytest.raises(ReductionSpecError) as caught:
        parse_reduction({"method": "pyramiddrop", "ratios": [1.0, 2.0]}, "token_reduction")
    assert "'ratios[1]' = 2.0 is out of range" in str(caught.value) and "keep" not in str(caught.value)


def test_qwen2_vl_profile_inputs_take_a_token_reduction():
    from visorlib.models.qwen2_vl import Qwen2VLProcessor

    processor = Qwen2VLProcessor(visorlib.get_config("qwen2-vl-2b").tiny())
    image = Image.new("RGB", (64, 64), (10, 120, 200))
    plain = processor.profile_inputs(image, 6)[0]
    reduced = processor.profile_inputs(image, 6, token_reduction={"method": "fastv", "keep": 0.5})[0]
    assert torch.equal(plain, reduced)  # in-LLM pruning happens inside the decoder
    with pytest.raises(ReductionSpecError, match="visionzip is a pre-LLM method"):
        processor.profile_inputs(image, 6, token_reduction={"method": "visionzip", "keep": 8})


PROFILE_CASES = [
    ("keep-above-a-tile", ['{"method": "visionzip", "keep": 1000}'], ["visionzip", "'keep' count 1000"]),
    ("keep-above-the-input", ['{"method": "fastv", "keep": 100000}'], ["fastv", "'keep' count 100000"]),
]


@pytest.mark.parametrize("case", PROFILE_CASES, ids=[c[0] for c in PROFILE_CASES])
def test_profile_checks_a_token_reduction_before_profiling(case, monkeypatch, capsys):
    _, specs, expected = case
    monkeypatch.setattr("visorlib.zoo.instantiate", lambda *a, **k: pytest.fail("the model was built first"))
    argv = ["profile", "visor-llava-ov-0.5b", "--tiny"] + [x for spec in specs for x in ("--token-reduction", spec)]
    code, _, err = run_cli(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and "--token-reduction" in line and all(text in line for text in expected), line


def test_profile_refuses_zero_text_tokens(capsys):
    code, _, err = run_cli(["profile", "visor-llava-ov-0.5b", "--tiny", "--text-tokens", "0"], capsys)
    assert code == 2 and "--text-tokens: must be positive, got 0" in one_error_line(err)


# ----------------------------------------------------------------------------- data synth
def test_synth_bounds_the_image_size_before_allocating(tmp_path, capsys):
    code, _, err = run_cli(["data", "synth", tmp_path / "out", "--tiny", "--samples", "1", "--image-size", "100000"],
                           capsys)
    assert code == 2 and "--image-size: must be at most 4096, got 100000" in one_error_line(err)
    cfg = visorlib.get_config("visor-llava-ov-0.5b").tiny()
    with pytest.raises(ValueError, match="image_size must be an integer from 32 to 4096 pixels, got 100000"):
        make_synthetic_dataset(tmp_path / "api", cfg, samples=1, image_size=100000)
    assert not (tmp_path / "out").exists() and not (tmp_path / "api").exists()


# ----------------------------------------------------------------------------- lmms-eval model_args
LMMS_CASES = [
    ("typo", {"sa_layer": "router"}, ["unknown key(s) sa_layer", "known: pretrained, sa_layers"]),
    ("batch-negative", {"batch_size": -3}, ["batch_size=-3", "must be >= 1"]),
    ("batch-zero", {"batch_size": 0}, ["batch_size=0", "must be >= 1"]),
    ("max-new-tokens-text", {"max_new_tokens": "abc"}, ["max_new_tokens='abc'", "an integer >= 1"]),
    ("max-new-tokens-float", {"max_new_tokens": 1.5}, ["max_new_tokens=1.5"]),
]


@pytest.mark.parametrize("case", LMMS_CASES, ids=[c[0] for c in LMMS_CASES])
def test_lmms_eval_model_args_are_checked_naming_the_key(case, monkeypatch):
    pytest.importorskip("lmms_eval")
    from visorlib.eval.lmms import VisorlibLMM

    _, args, expected = case
    monkeypatch.setattr("visorlib.eval.runner._load_model", lambda *a: pytest.fail("loaded before the check"))
    with pytest.raises(ValueError) as caught:
        VisorlibLMM(pretrained="somewhere", **args)
    assert all(text in str(caught.value) for text in expected), str(caught.value)


# ----------------------------------------------------------------------------- the command itself
def test_help_loads_no_torch_and_ctrl_c_is_one_line(capsys, monkeypatch):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    probe = ("import sys, contextlib, io\nimport visorlib.cli as c\n"
             "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
             "    c.main(['--help'])\nprint(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("visorlib.cli.cmd_list", interrupted)
    code, _, err = run_cli(["list"], capsys)
    assert code == 130 and one_error_line(err) == "visorlib: error: interrupted"


def test_waiting_time_counts_from_the_process_start():
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    probe = "import time; time.sleep(0.6)\nfrom visorlib.cli_args import seconds_since_process_start as s\nprint(s())"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    waited = float(done.stdout)
    assert 0.6 <= waited <= time.perf_counter() - started + 0.05, (waited, done.stderr)
