"""The ``visorlib`` command end to end on tiny models (no network)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from visor_helpers import word_tokenizer

import visorlib
from visorlib.cli import main


def test_list_and_info(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "llava-ov-0.5b" in out and "llava-ov-7b" in out
    assert main(["info", "llava-ov-0.5b"]) == 0
    out = capsys.readouterr().out
    assert "893,675,552" in out and "24 layers" in out and "llava-hf/llava-onevision-qwen2-0.5b-ov-hf" in out


def test_unknown_model_is_a_clean_error(capsys):
    assert main(["info", "llava-ov-9b"]) == 2
    assert "unknown model 'llava-ov-9b'" in capsys.readouterr().err


def test_profile_tiny_with_image(tmp_path, capsys):
    image = tmp_path / "page.png"
    Image.new("RGB", (90, 60), (10, 200, 30)).save(image)
    report = tmp_path / "profile.json"
    assert main(["profile", "llava-ov-0.5b", "--tiny", "--image", str(image), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["visual_tokens"] == visorlib.processing.anyres.num_image_tokens((60, 90), [[30 * i, 30 * j] for i in range(1, 7) for j in range(1, 7)], 30, 5, 9)
    assert result["configurations"][0]["llm_seconds"] > 0 and "random" in result["weights"]
    assert "analytic prefill FLOPs" in capsys.readouterr().out


def test_generate_from_a_checkpoint_folder(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = visorlib.get_config("llava-ov-0.5b").tiny()
    model = visorlib.zoo.instantiate(cfg).eval()
    model.save_pretrained(tmp_path / "ckpt")
    word_tokenizer(tmp_path / "ckpt", cfg)
    image = tmp_path / "cat.png"
    Image.new("RGB", (70, 50), (200, 100, 30)).save(image)
    code = main(["generate", "--model", str(tmp_path / "ckpt"), "--image", str(image), "--prompt", "what is this ?",
                 "--max-new-tokens", "5"])
    assert code == 0
    printed = capsys.readouterr().out.strip()
    # The same answer through the Python API: processor_for finds the checkpoint's tokenizer.
    loaded = visorlib.from_pretrained(tmp_path / "ckpt")
    processor = visorlib.processor_for(loaded)
    inputs = processor.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]}],
                            images=[Image.open(image)])
    out = loaded.generate(**inputs, max_new_tokens=5)
    assert printed == processor.decode(out[0, inputs["input_ids"].shape[1]:])


def test_processor_for_without_tokenizer_warns_and_handles_pixels():
    model = visorlib.zoo.instantiate(visorlib.get_config("llava-ov-0.5b").tiny(), "meta")
    with pytest.warns(UserWarning, match="prepare images only"):
        processor = visorlib.processor_for(model)
    assert processor.tokenizer is None


def test_info_counts_the_visor_blocks(capsys):
    assert main(["info", "visor-llava-ov-0.5b"]) == 0
    out = capsys.readouterr().out
    dense = visorlib.build("llava-ov-0.5b", device="meta")
    visor = visorlib.build("visor-llava-ov-0.5b", device="meta")
    added = sum(p.numel() for p in visor.language_model.visor_parameters().values())
    assert added == 14_995_725 and f"visor_blocks     {added:>15,d}" in out
    total = sum(p.numel() for p in dense.parameters()) + added
    assert total == 908_671_277 and f"total            {total:>15,d}  (908.67 M)" in out


def test_generate_sa_layers_and_tokenizer(tmp_path, capsys):
    from visorlib.train.synthdoc import pages

    image_path = tmp_path / "page.png"
    image, _, _ = next(pages(20261201, 1, 32))
    image.save(image_path)
    base = ["generate", "--model", "visor-synthdoc-tiny", "--image", str(image_path), "--prompt", "what colour is the ink ?",
            "--max-new-tokens", "3"]
    model = visorlib.build("visor-synthdoc-tiny", pretrained=True).eval()
    processor = visorlib.processor_for(model)
    inputs = processor.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the ink ?"}]}],
                            images=[image])
    for flag, sa_layers in (("none", []), ("1,3", [1, 3]), ("router", "router")):
        assert main([*base, "--sa-layers", flag]) == 0
        out = model.generate(**inputs, max_new_tokens=3, sa_layers=sa_layers)
        assert capsys.readouterr().out.strip() == processor.decode(out[0, inputs["input_ids"].shape[1]:])
    # --tokenizer: a checkpoint folder without one answers with the tokenizer named on the command line.
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "tok").mkdir()
    (tmp_path / "ckpt" / "tokenizer.json").rename(tmp_path / "tok" / "tokenizer.json")
    assert main([*ckpt_args(tmp_path, image_path)]) == 2  # no tokenizer anywhere: a clean error
    assert "no tokenizer found" in capsys.readouterr().err
    ckpt = ckpt_args(tmp_path, image_path)
    assert main([*ckpt, "--tokenizer", str(tmp_path / "tok")]) == 0
    out = model.generate(**inputs, max_new_tokens=3, sa_layers=[])
    assert capsys.readouterr().out.strip() == processor.decode(out[0, inputs["input_ids"].shape[1]:])
    # Wrong configurations are one-line errors naming the flag.
    assert main([*base, "--sa-layers", "2"]) == 2
    assert "--sa-layers '2'" in capsys.readouterr().err
    assert main([*base, "--sa-layers", "all"]) == 2
    assert "names 6 configurations" in capsys.readouterr().err
    assert main([*ckpt, "--tokenizer", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def ckpt_args(tmp_path, image_path):
    return ["generate", "--model", str(tmp_path / "ckpt"), "--image", str(image_path), "--prompt", "what colour is the ink ?",
            "--max-new-tokens", "3", "--sa-layers", "none"]
