"""Token-reduction rows of ``visorlib profile`` and ``visorlib eval``: what runs, and what is counted.

What is checked: the paper-setting rows and a ``--token-reduction`` row exist, hold the processor's
reduced visual-token count and exactly the analytic FLOPs of :func:`visorlib.flops` under their
spec; eval columns under a spec generate what ``generate(token_reduction=...)`` generates on the
prompt encoded under that spec, and their FLOPs are the in-LLM-aware count; bad specs are usage
errors before anything is built.
"""

from __future__ import annotations

import json

import pytest
from eval_helpers import load, tiny_checkpoint
from PIL import Image

import visorlib
from visorlib.cli import main
from visorlib.eval import evaluate, load_local, runner
from visorlib.flops import decode_step_flops
from visorlib.models.llava_onevision import LlavaOnevisionProcessor


def test_profile_has_paper_rows_and_a_user_spec_row_with_exact_counts(tmp_path):
    image = tmp_path / "page.png"
    Image.new("RGB", (90, 60), (10, 200, 30)).save(image)
    out = tmp_path / "profile.json"
    spec = {"method": "pooling", "keep": 0.25}
    assert main(["profile", "visor-llava-ov-0.5b", "--tiny", "--image", str(image), "--paper-reductions",
                 "--token-reduction", json.dumps(spec), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["configuration"]: r for r in result["configurations"]}
    labels = ["visionzip 128/tile (104+24)", "vispruner 128/tile (96+32)", "hired 20%", "pooling 8x", "fastv K=2 R=50%",
              "pyramiddrop easy", "8CA-2SA [1, 4] + visionzip"]
    assert all(label in rows for label in labels)
    cfg = visorlib.get_config("visor-llava-ov-0.5b").tiny()
    processor = LlavaOnevisionProcessor(cfg)
    for label in [*labels, 'dense + {"method":"pooling","keep":0.25}', '8CA-2SA [1, 4] + {"method":"pooling","keep":0.25}']:
        row = rows[label]
        reduction = row["token_reduction"]
        assert row["visual_tokens"] == processor.num_image_tokens((60, 90), token_reduction=reduction)
        model_cfg = cfg if row["sa_layers"] is not None else cfg.with_overrides({"visor": None})
        expected = visorlib.flops(model_cfg, n_visual=result["visual_tokens"], n_text=result["text_tokens"],
                                  tiles=result["tiles"], sa_layers=row["sa_layers"], token_reduction=reduction)
        assert row["llm_flops"] == expected.language_model
        assert row["llm_flops"] < rows["dense"]["llm_flops"] and row["vision_seconds"] > 0
    assert rows["8CA-2SA [1, 4] + visionzip"]["llm_flops"] < rows["visionzip 128/tile (104+24)"]["llm_flops"]


@pytest.mark.parametrize(("argv", "message"), [
    (["profile", "llava-ov-0.5b", "--tiny", "--token-reduction", "{visionzip"], "is not JSON"),
    (["profile", "llava-ov-0.5b", "--tiny", "--token-reduction", '{"method": "visionzp"}'], "unknown method"),
    (["profile", "qwen2-vl-2b", "--tiny", "--token-reduction", '{"method": "hired"}'], "runs no pre-LLM method"),
    (["eval", "llava-ov-0.5b", "--data", "x.jsonl", "--token-reduction", '{"method": "fastv", "kep": 1}'],
     "unknown key 'kep'"),
])
def test_bad_specs_are_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt, data = tiny_checkpoint(tmp_path_factory.mktemp("eval-reduction"))
    model, processor = load(ckpt)
    return ckpt, data, model, processor


SPECS = [{"method": "pooling", "keep": 0.25}, {"method": "fastv", "layer": 2}]


def test_eval_columns_under_each_spec_generate_and_count_under_it(tiny, tmp_path):
    _, data, model, processor = tiny
    path = tmp_path / "p.jsonl"
    report = evaluate(model, str(data), configs="1,4", limit=2, batch_size=2, max_new_tokens=3, progress=False,
                      processor=processor, predictions=path, token_reductions=SPECS)
    assert report.configurations == ["1,4", "1,4 + pooling(keep=0.25)", "1,4 + fastv(layer=2)"]
    records = {(r["sample"], r["configuration"]): r for r in map(json.loads, path.read_text().splitlines())}
    samples = {s.key: s for s in load_local(str(data)).samples}
    assert len(records) == 6
    for (key, label), r in records.items():
        spec = None if label == "1,4" else SPECS[0] if "pooling" in label else SPECS[1]
        assert r["token_reduction"] == spec
        encoded = runner.encode_prompt(processor, samples[key].question, samples[key].images(), spec)
        n_visual = int(model.language_model.visual_token_mask(encoded["input_ids"][None]).sum())
        assert r["n_visual"] == n_visual
        (alone,) = runner.generate_batch(model, processor, [encoded], [[1, 4]], 3, token_reduction=spec)
        assert r["prediction"] == alone.text
        in_llm = [SPECS[1]] if spec is SPECS[1] else []
        prefill = visorlib.flops(model, n_visual=n_visual, n_text=r["n_text"], sa_layers=[1, 4], token_reduction=in_llm)
        decode = sum(decode_step_flops(model.cfg, n_visual, r["n_text"] + i, [1, 4], prefill.visual_per_layer)
                     for i in range(r["generated_tokens"] - 1))
        assert r["prefill_flops"] == prefill.language_model
        assert r["flops"] == pytest.approx(prefill.language_model + decode, rel=1e-12)
    base, pooled, fastv = (report.row("data", c) for c in report.configurations)
    assert pooled.prefill_flops < base.prefill_flops and fastv.prefill_flops < base.prefill_flops
