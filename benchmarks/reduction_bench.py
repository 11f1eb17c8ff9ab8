"""Prefill time vs analytic FLOPs of every token-reduction method, next to dense and VISOR (issue 12).

Real LLaVA-OneVision 0.5B dimensions (``visor-llava-ov-0.5b``: SigLIP-so400m tower, Qwen2-0.5B
decoder, VISOR blocks), random weights, fp32, measured side by side in one run: the dense plan,
each method at the paper's settings (``visorlib.profiling.PAPER_REDUCTIONS``) and VISOR 8CA-2SA +
VisionZip, at batch 1 and batch 8, with the ratios to dense. For every row the time spent
computing scores (tower-attention scores and the methods' similarity products for pre-LLM
methods; the decoder's last-token scores for in-LLM methods) is measured inside the same run
and given as a share of the row's prefill.

How it is measured (to keep a 1-thread CPU run near 10 minutes, the JSON says so too):

* the vision path (tower, reducer, projector) runs at batch 1 under each row's spec; a batch of
  B images costs B times that (the tower sees each tile independently), so the batch-8 prefill
  adds ``8 x`` the batch-1 vision time instead of running the tower on 8 copies;
* the language model runs at batch 1 and batch 8 (the same prompt repeated) under the row's plan
  and in-LLM pruning, best of ``--repeats`` (default 1);
* the default image is ``visorlib profile``'s embedded 384x384 page (2 tiles, 1485 visual tokens);
* one warm-up language-model call before the first timed row (the vision path is warmed by the
  call that produces the embeddings).

Run it under the shared benchmark lock::

    flock /tmp/visorlib-bench.lock python benchmarks/reduction_bench.py --json benchmarks/results/reduction-bench-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import visorlib
from visorlib.cli import default_profile_image
from visorlib.profiling import _dense_cfg, best_time, paper_reduction_rows
from visorlib.registry import family_of
from visorlib.visor import pruning as pruning_module
from visorlib.visor.executor import PlanExecutor
from visorlib.visor.plan import LayerPlan
from visorlib.visor.pruning import Pruning
from visorlib.visor.reduction import pre_llm as pre_llm_module


class ScoringClock:
    """Wraps the two places scores are computed and sums the seconds spent in them."""

    def __init__(self):
        self.seconds = 0.0
        self._originals = []

    def _wrap(self, module, name):
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        self._originals.append((module, name, original))
        setattr(module, name, timed)

    def __enter__(self):
        self._wrap(pre_llm_module, "apply_pre_llm")  # tower scores + selection/merging (pooling: no scores)
        self._wrap(pruning_module, "last_token_scores")  # decoder scores at each scoring layer
        return self

    def __exit__(self, *exc):
        for module, name, original in self._originals:
            setattr(module, name, original)


@torch.inference_mode()
def measure(model, rows, ids_for, vision, tiles, batches, repeats, log):
    plan = model.plan
    out = []
    warmed = False
    for label, spec, config in rows:
        ids = ids_for(spec)
        pre_llm, in_llm = model.reducers(spec)
        options = {"token_reduction": spec} if pre_llm else {}
        with ScoringClock() as clock:
            embeds, visual, segments = model.embed(ids, **vision, **options)
        vision_scoring = clock.seconds
        log(f"{label}: vision path ...")
        vision_seconds = best_time(lambda ids=ids, o=options: model.embed(ids, **vision, **o), repeats, torch.device("cpu"))
        n_visual = int(visual.sum())
        n_text = ids.shape[1] - n_visual
        row_plan = plan if config is not None else LayerPlan(plan.num_layers)
        executes_layers = config if config is not None else list(range(plan.num_layers))
        report = visorlib.flops(model.cfg if config is not None else _dense_cfg(model.cfg), n_visual, n_text, tiles,
                                sa_layers=config, token_reduction=spec or [])
        row = {"row": label, "token_reduction": spec, "sa_layers": config, "visual_tokens_entering_llm": n_visual,
               "visual_tokens_per_layer": report.visual_per_layer, "text_tokens": n_text,
               "analytic_flops_per_sample": report.components, "analytic_total_flops_per_sample": report.total,
               "analytic_llm_flops_per_sample": report.language_model,
               "vision_seconds_per_image": vision_seconds, "vision_scoring_seconds_per_image": vision_scoring}
        for batch in batches:
            executor = PlanExecutor(model.decoder, row_plan, model.cross_attention, model.cfg.attn_implementation,
                                    Pruning(in_llm, plan.num_layers) if in_llm else None)
            executes = torch.zeros(batch, plan.num_layers, dtype=torch.bool)
            executes[:, executes_layers] = True
            e, v, g = (x.expand(batch, *x.shape[1:]).contiguous() for x in (embeds, visual, segments))
            positions = torch.arange(ids.shape[1])[None].expand(batch, -1)
            mask = torch.ones(batch, ids.shape[1], dtype=torch.long)

            def run(executor=executor, executes=executes, e=e, v=v, g=g, positions=positions, mask=mask):
                hidden = executor.run(e, positions, mask, v, g, executes)
                return model.decoder.logits(hidden[:, -1:])

            if not warmed:  # the first call pays for allocator growth; keep it out of the dense row
                run()
                warmed = True
            log(f"{label}: language model, batch {batch} ...")
            with ScoringClock() as clock:
                llm_seconds = best_time(run, repeats, torch.device("cpu"))
            llm_scoring = clock.seconds / max(1, repeats)
            prefill = batch * vision_seconds + llm_seconds
            row[f"batch_{batch}"] = {
                "llm_seconds": llm_seconds,
                "prefill_seconds": prefill,
                "scoring_seconds": batch * vision_scoring + llm_scoring,
                "scoring_share_of_prefill": (batch * vision_scoring + llm_scoring) / prefill,
                "analytic_total_flops": batch * report.total,
                "analytic_llm_flops": batch * report.language_model,
                "measured_gflops_per_second": batch * report.total / prefill / 1e9,
            }
        out.append(row)
    dense = out[0]
    for row in out:
        for batch in batches:
            b, d = row[f"batch_{batch}"], dense[f"batch_{batch}"]
            b["flop_saving_total"] = d["analytic_total_flops"] / b["analytic_total_flops"]
            b["flop_saving_llm"] = d["analytic_llm_flops"] / b["analytic_llm_flops"]
            b["speedup_prefill"] = d["prefill_seconds"] / b["prefill_seconds"]
            b["speedup_llm"] = d["llm_seconds"] / b["llm_seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="visor-llava-ov-0.5b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="the card's tiny variant (a smoke test of this script)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    cfg = visorlib.get_config(args.model)
    cfg = cfg.tiny() if args.tiny else cfg
    torch.manual_seed(0)
    started = time.perf_counter()
    model = visorlib.zoo.instantiate(cfg).eval()
    processor = family_of(cfg).processor(cfg, None)
    image = default_profile_image()
    ids, vision, tiles = processor.profile_inputs(image, args.text_tokens)

    def ids_for(spec):
        return processor.profile_inputs(image, args.text_tokens, token_reduction=spec)[0] if spec else ids

    # keep=1.0 is no reduction (visorlib.visor.reduction.drops_nothing): the row must match dense in
    # tokens and FLOPs, so an accuracy- or time-vs-keep curve starts at the unreduced point.
    unreduced = ("visionzip keep=1.0 (unreduced)", {"method": "visionzip", "keep": 1.0}, None)
    rows = [("dense", None, None), unreduced] + paper_reduction_rows(model.plan, True, cfg.feature_grid_size**2)
    batches = [int(b) for b in args.batches.split(",")]
    results = measure(model, rows, ids_for, vision, tiles, batches, args.repeats, log)
    print(f"\n{'row':34s} {'vis':>5s} " + " ".join(
        f"{'b' + str(b) + ' FLOPx':>9s} {'b' + str(b) + ' timex':>9s} {'b' + str(b) + ' LLMx':>8s} {'score%':>7s}"
        for b in batches))
    for r in results:
        cells = " ".join(f"{r[f'batch_{b}']['flop_saving_total']:8.2f}x {r[f'batch_{b}']['speedup_prefill']:8.2f}x "
                         f"{r[f'batch_{b}']['speedup_llm']:7.2f}x {100 * r[f'batch_{b}']['scoring_share_of_prefill']:6.2f}%"
                         for b in batches)
        print(f"{r['row'][:34]:34s} {r['visual_tokens_entering_llm']:5d} {cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "model": cfg.name + (" (tiny)" if args.tiny else ""), "weights": "random, real-size architecture",
                "device": platform.processor() or platform.machine(), "threads": args.threads,
                "torch": torch.__version__, "dtype": "float32", "image": "embedded 384x384 default profile image",
                "tiles": tiles, "text_tokens": args.text_tokens, "repeats": args.repeats, "batches": batches,
                "method": "vision path measured at batch 1 under each spec and charged B times at batch B; language "
                          "model measured at each batch size (the prompt repeated); scoring time measured inside "
                          "the same runs (apply_pre_llm and last_token_scores); 1 repeat and the 384x384 image to keep "
                          "a 1-thread CPU run near 10 minutes",
                "wall_seconds": time.perf_counter() - started,
                "rows": results,
            }, f, indent=1)


if __name__ == "__main__":
    main()
