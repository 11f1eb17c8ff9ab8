"""visorlib eval: batched mixed configurations, per-sample FLOPs, resume, broken rows, the command."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import load, tiny_checkpoint

import visorlib
from visorlib.cli import main
from visorlib.eval import evaluate, load_local, runner
from visorlib.flops import decode_step_flops
from visorlib.train import DataError

CONFIGS = "1,4;1,4,7,10,16,19,22;router"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt, data = tiny_checkpoint(tmp_path_factory.mktemp("eval"))
    model, processor = load(ckpt)
    return ckpt, data, model, processor


def run(tiny, **kwargs):
    _, data, model, processor = tiny
    options = dict(configs=CONFIGS, limit=3, batch_size=4, max_new_tokens=3, progress=False, processor=processor)
    options.update(kwargs)
    return evaluate(model, str(data), **options)


def predictions(path):
    return {(r["sample"], r["configuration"]): r for r in map(json.loads, path.read_text().splitlines())}


def stable(report):
    """The report without measured times (they differ between runs)."""
    rows = [{k: v for k, v in vars(r).items() if k != "seconds"} for r in report.rows]
    return rows, report.skipped


def test_per_sample_configurations_in_one_batch_equal_one_by_one(tiny, tmp_path):
    _, _, model, processor = tiny
    run(tiny, predictions=tmp_path / "mixed.jsonl", mix_configs=True, batch_size=4)
    run(tiny, predictions=tmp_path / "single.jsonl", batch_size=1)
    mixed, single = predictions(tmp_path / "mixed.jsonl"), predictions(tmp_path / "single.jsonl")
    assert mixed.keys() == single.keys() and len(mixed) == 9
    for key, record in mixed.items():
        other = single[key]
        assert (record["prediction"], record["sa_layers"], record["flops"]) == \
            (other["prediction"], other["sa_layers"], other["flops"]), key
    # The mixed run really mixed: one generate_batch call with several configurations in it.
    dataset = load_local(str(tiny[1]))
    encoded = [runner.encode_prompt(processor, s.question, s.images()) for s in dataset.samples[:3]]
    configs = [[1, 4], [1, 4, 7, 10, 16, 19, 22], [1, 7]]
    together = runner.generate_batch(model, processor, encoded, configs, 3)
    alone = [runner.generate_batch(model, processor, [e], [c], 3)[0] for e, c in zip(encoded, configs, strict=True)]
    assert [(g.text, g.tokens, g.sa_layers) for g in together] == [(g.text, g.tokens, g.sa_layers) for g in alone]


def test_flops_per_sample_are_visorlib_flops_of_its_token_counts(tiny, tmp_path):
    _, _, model, processor = tiny
    report = run(tiny, predictions=tmp_path / "p.jsonl")
    records = predictions(tmp_path / "p.jsonl")
    samples = {s.key: s for s in load_local(str(tiny[1])).samples}
    for (key, label), r in records.items():
        ids = runner.encode_prompt(processor, samples[key].question, samples[key].images())["input_ids"]
        n_visual = int(model.language_model.visual_token_mask(ids[None]).sum())
        assert (r["n_visual"], r["n_text"]) == (n_visual, ids.shape[0] - n_visual)
        config = r["sa_layers"]
        assert config in model.plan.configurations
        if label != "router":
            assert config == [int(i) for i in label.split(",")]
        prefill = visorlib.flops(model, n_visual=n_visual, n_text=r["n_text"], sa_layers=config).language_model
        decode = sum(decode_step_flops(model.cfg, n_visual, r["n_text"] + i, config) for i in range(r["generated_tokens"] - 1))
        assert r["prefill_flops"] == prefill and r["flops"] == pytest.approx(prefill + decode, rel=1e-12)
    # Fewer executed SA layers cost less; the table's mean is the mean of the samples.
    small, full = report.row("data", "1,4"), report.row("data", "1,4,7,10,16,19,22")
    assert small.prefill_flops < full.prefill_flops
    mean = sum(r["flops"] for (_, c), r in records.items() if c == "1,4") / 3
    assert small.flops == pytest.approx(mean)
    router = report.row("data", "router")
    assert sum(router.choices.values()) == 3


def test_router_predictions_are_generation_under_its_choices(tiny, tmp_path):
    _, _, model, processor = tiny
    run(tiny, predictions=tmp_path / "p.jsonl", configs="router")
    records = predictions(tmp_path / "p.jsonl")
    samples = {s.key: s for s in load_local(str(tiny[1])).samples}
    for (key, _), r in records.items():
        encoded = runner.encode_prompt(processor, samples[key].question, samples[key].images())
        fixed = runner.generate_batch(model, processor, [encoded], [r["sa_layers"]], 3)[0]
        assert fixed.text == r["prediction"]


def test_a_killed_run_resumes_to_the_same_table(tiny, tmp_path, monkeypatch):
    reference = run(tiny, predictions=tmp_path / "full.jsonl", batch_size=2)
    calls = {"n": 0}
    real = runner.generate_batch

    def dies_on_the_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_batch", dies_on_the_third_batch)
    path = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(tiny, predictions=path, batch_size=2)
    written = len(path.read_text().splitlines())
    assert 0 < written < 9
    with open(path, "a") as handle:  # a kill can also leave half a line behind
        handle.write('{"sample": "data/2", "configur')
    monkeypatch.setattr(runner, "generate_batch", real)
    generated = []
    monkeypatch.setattr(runner, "generate_batch", lambda m, p, enc, *a, **k: generated.append(len(enc)) or real(m, p, enc, *a, **k))
    resumed = run(tiny, predictions=path, batch_size=2)
    assert sum(generated) == 9 - written  # only what was missing
    assert stable(resumed) == stable(reference)
    assert len(path.read_text().splitlines()) == 9


def bad_data(tmp_path, data):
    rows = [json.loads(line) for line in data.read_text().splitlines()[:3]]
    rows[1]["image"] = "images/missing.png"
    rows[2]["conversations"] = rows[2]["conversations"][:1]  # no answer
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_broken_rows_are_reported_with_file_and_index_under_the_users_policy(tiny, tmp_path):
    _, data, model, processor = tiny
    path = bad_data(tmp_path, data)
    report = evaluate(model, str(path), configs="1,4", max_new_tokens=2, progress=False, processor=processor,
                      image_root=str(data.parent), max_skip_fraction=1.0)
    assert [(s["file"], s["index"]) for s in report.skipped] == [(str(path), 1), (str(path), 2)]
    assert "not found" in report.skipped[0]["error"] and "no reference answer" in report.skipped[1]["error"]
    assert report.row("bad", "1,4").samples == 1
    assert f"skipped: {path}[1]" in report.table()
    with pytest.raises(DataError, match=rf"{path}\[1\]: image .*missing.png not found"):
        evaluate(model, str(path), configs="1,4", on_error="fail", progress=False, processor=processor,
                 image_root=str(data.parent))
    with pytest.raises(runner.EvalIncomplete, match=r"2 of 3 samples were skipped .*--max-skip-fraction=0.1"):
        evaluate(model, str(path), configs="1,4", progress=False, processor=processor, image_root=str(data.parent))


def test_configs_are_parsed_and_checked(tiny):
    model = tiny[2]
    labels = [c.label for c in runner.parse_configs(model, "all")]
    assert labels[:-1] == [",".join(map(str, c)) for c in model.plan.configurations] and labels[-1] == "router"
    assert [c.label for c in runner.parse_configs(model, "default;1,4;[1, 4]")] == ["1,4,7,10,16,19,22", "1,4"]
    assert [(c.label, c.sa_layers) for c in runner.parse_configs(model, "none;1,4;")] == [("none", []), ("1,4", [1, 4])]
    with pytest.raises(ValueError, match="--configs '1,2'.*not self-attention candidates"):
        runner.parse_configs(model, "1,2")


def test_the_eval_command_writes_table_json_predictions_and_plot(tiny, tmp_path, capsys):
    ckpt, data, _, _ = tiny
    out = tmp_path / "report.json"
    code = main(["eval", str(ckpt), "--data", str(data), "--configs", "1,4;router", "--limit", "2",
                 "--max-new-tokens", "2", "--json", str(out), "--predictions", str(tmp_path / "p.jsonl"),
                 "--plot", str(tmp_path / "plot.png"), "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "configuration" in table and "router" in table and "LLM FLOPs" in table
    report = json.loads(out.read_text())
    assert {r["configuration"] for r in report["rows"]} == {"1,4", "router"}
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert main(["eval", str(ckpt), "--data", str(data), "--configs", "2,3", "--no-progress"]) == 2
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("card", ["llava-ov-0.5b", "visor-qwen2-vl-2b"])
def test_other_families_and_dense_models_batch_like_one_by_one(card, tmp_path):
    from visorlib.models import family_of
    from visorlib.train import make_synthetic_dataset

    cfg = visorlib.get_config(card).tiny()
    data = make_synthetic_dataset(tmp_path / "synth", cfg, samples=1, image_size=60)
    torch.manual_seed(0)
    model = visorlib.zoo.instantiate(cfg).eval()
    processor = family_of(cfg).processor(cfg, tmp_path / "synth")  # the synthetic task's tokenizer
    configs = "default" if model.plan.dense else "default;1,4"
    options = dict(configs=configs, max_new_tokens=3, progress=False, processor=processor)
    evaluate(model, str(data), batch_size=4, mix_configs=True, predictions=tmp_path / "a.jsonl", **options)
    report = evaluate(model, str(data), batch_size=1, predictions=tmp_path / "b.jsonl", **options)
    mixed, single = predictions(tmp_path / "a.jsonl"), predictions(tmp_path / "b.jsonl")
    assert {k: r["prediction"] for k, r in mixed.items()} == {k: r["prediction"] for k, r in single.items()}
    if model.plan.dense:
        assert [r.configuration for r in report.rows] == ["dense"] * 3  # all, easy, hard
        record = next(iter(single.values()))
        assert record["prefill_flops"] == visorlib.flops(model, record["n_visual"], record["n_text"]).language_model


def test_generation_never_writes_an_image_placeholder(tiny):
    """A model whose favourite token is <image> still decodes (a placeholder needs pixels)."""
    _, data, model, processor = tiny
    sample = load_local(str(data)).samples[0]
    encoded = runner.encode_prompt(processor, sample.question, sample.images())
    logits = model.decoder.logits
    bias = torch.zeros(model.cfg.decoder.vocab_size)
    bias[[model.cfg.tokens.image_token_id, model.cfg.tokens.video_token_id]] = 1e4
    model.decoder.logits = lambda hidden: logits(hidden) + bias
    try:
        out = runner.generate_batch(model, processor, [encoded], [1, 4], 4)[0]
    finally:
        del model.decoder.logits
    assert out.tokens >= 1 and "<image>" not in out.text


def test_lines_of_another_answer_length_are_not_reused(tiny, tmp_path):
    path = tmp_path / "p.jsonl"
    run(tiny, predictions=path, configs="1,4", limit=2, max_new_tokens=2)
    report = run(tiny, predictions=path, configs="1,4", limit=2, max_new_tokens=3)
    fresh = run(tiny, predictions=tmp_path / "fresh.jsonl", configs="1,4", limit=2, max_new_tokens=3)
    assert stable(report) == stable(fresh)
    assert len(path.read_text().splitlines()) == 4  # the two 2-token lines were not reused


def test_out_dir_holds_predictions_and_the_report(tiny, tmp_path):
    report = run(tiny, configs="1,4", limit=1, out_dir=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rows"][0]["score"] == report.rows[0].score and saved["configurations"] == ["1,4"]
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match=r"several datasets are named \['data'\]"):
        evaluate(tiny[2], [str(tiny[1])] * 2, processor=tiny[3], progress=False)


def test_the_table_prints_long_labels_whole_and_aligned():
    from visorlib.eval.report import EvalReport, ReportRow

    labels = ["8CA-2SA + visionzip(keep=128)", "8CA-2SA + vispruner(keep=128)"]
    rows = [ReportRow("a-very-long-dataset-name", "all", label, 4, 50.0, "exact", 1e9, 1e9, 1e6, 0.1, 3.0)
            for label in labels]
    lines = EvalReport("m", labels, rows).table().splitlines()
    assert all(any(label in line for line in lines) for label in labels)
    assert "a-very-long-dataset-name" in lines[2]
    assert len({line.index("50.00%") for line in lines[2:]}) == 1  # the number columns line up
