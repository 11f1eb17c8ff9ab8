"""``visorlib demo``: the shipped, CPU-trained VISOR model answering questions, offline.

It loads ``visor-synthdoc-tiny`` with its packaged weights and tokenizer (no network), draws a few
synthdoc pages from a seed no training run used, and

1. answers one question of every kind on each example page (an easy, a hard and a two-place
   question of the shipped model's task) under the cheapest configuration (cross-attention only),
   the full one and the router, printing the answers next to the truth;
2. scores a small held-out set of such pages under every configuration and the router, printing
   accuracy per question kind, the language model's analytic prefill FLOPs per sample (VISOR's
   cost measure) and the measured time, and the router's choices per kind.

The task is described in ``docs/synthdoc.md``; the training chain is ``recipes/synthdoc-*.yaml``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

#: The held-out seed of the demo and of the regression test: never used by a training recipe
#: (those use seeds 1 and 2).
HELD_OUT_SEED = 20261201


def configurations_to_show(model) -> list[tuple[str, Any]]:
    """``(label, sa_layers)`` of the dense model, or of every VISOR configuration and the router."""
    plan = model.plan
    if plan.dense:
        return [("dense", None)]
    rows = [(_label(c), list(c)) for c in sorted(plan.configurations, key=plan.cost)]
    if model.router is not None:
        rows.append(("router", "router"))
    return rows


def _label(configuration) -> str:
    return "CA-only []" if not configuration else "SA " + ",".join(map(str, configuration))


def language_model_flops(model, sample: dict, configuration) -> float:
    """Analytic prefill FLOPs of the language model for one encoded sample under ``configuration``."""
    from .flops import flops

    n_visual = int(model.language_model.visual_token_mask(sample["input_ids"][None]).sum())
    n_text = sample["input_ids"].shape[0] - n_visual
    return flops(model, n_visual=n_visual, n_text=n_text, sa_layers=configuration).language_model


def evaluate(model, processor, seed: int = HELD_OUT_SEED, pages: int = 30, task=None) -> list[dict[str, Any]]:
    """Accuracy per question kind, LLM FLOPs per sample and time, for every configuration.

    Returns:
        One row per configuration: ``label``, ``sa_layers``, ``accuracy`` (per kind and
        ``"all"``), ``gflops_per_sample`` (mean language-model prefill), ``seconds``, and for the
        router ``choices`` (configuration label counts per kind). ``task``: the synthdoc task
        (default: the shipped model's, :data:`visorlib.train.synthdoc.DEFAULT_TASK`).
    """
    from .train.synthdoc import DEFAULT_TASK, held_out_questions, score_samples

    task = task or DEFAULT_TASK
    questions = held_out_questions(processor, seed, pages, task)
    flat = [s for c in task.categories for s in questions[c]]
    rows = []
    for label, sa_layers in configurations_to_show(model):
        started = time.perf_counter()
        hits, chosen = score_samples(model, flat, sa_layers)
        seconds = time.perf_counter() - started
        accuracy, choices, offset = {}, {}, 0
        for category in task.categories:
            n = len(questions[category])
            accuracy[category] = sum(hits[offset:offset + n]) / n
            if sa_layers == "router":
                choices[category] = dict(Counter(_label(c) for c in chosen[offset:offset + n]))
            offset += n
        accuracy["all"] = sum(hits) / len(hits)
        cost = [language_model_flops(model, s, c if sa_layers == "router" else sa_layers)
                for s, c in zip(flat, chosen, strict=True)]
        row = {"label": label, "sa_layers": sa_layers, "accuracy": accuracy,
               "gflops_per_sample": sum(cost) / len(cost) / 1e9, "seconds": seconds, "samples": len(flat)}
        if choices:
            row["choices"] = choices
        rows.append(row)
    return rows


def at_a_glance(rows: list[dict[str, Any]]) -> str:
    """VISOR's point in three lines, computed from :func:`evaluate`'s rows of a VISOR model.

    What the cheapest configuration answers and what it does not, what the full one adds, and how
    the router spends self-attention layers per kind of question and what that costs.
    """
    by_label = {row["label"]: row for row in rows}
    cheap, router = rows[0], by_label["router"]
    full = max((row for row in rows if isinstance(row["sa_layers"], list)), key=lambda row: len(row["sa_layers"]))
    kinds = [k for k in cheap["accuracy"] if k != "all"]
    fails = [k for k in kinds if full["accuracy"][k] - cheap["accuracy"][k] >= 0.05]
    knows = [k for k in kinds if k not in fails]

    def accs(row, which):
        return ", ".join(f"{k} {row['accuracy'][k]:.2f}" for k in which)

    def with_sa(kind):
        counts = router["choices"][kind]
        return sum(n for label, n in counts.items() if label != cheap["label"]) / max(1, sum(counts.values()))

    lines = [f"at a glance: {cheap['label']} answers {accs(cheap, knows) or 'no kind'}"
             + (f" but not {accs(cheap, fails)}" if fails else "")
             + (f"; {full['label']} answers those ({accs(full, fails)})" if fails else "")]
    lines.append("  the router runs self-attention layers for " + ", ".join(
        f"{100 * with_sa(k):.0f} % of {k}" for k in kinds) + " questions")
    saving = full["gflops_per_sample"] / max(router["gflops_per_sample"], 1e-12)
    share = router["accuracy"]["all"] / max(full["accuracy"]["all"], 1e-12)
    lines.append(f"  and keeps {100 * share:.1f} % of {full['label']}'s accuracy at {saving:.2f}x fewer LLM FLOPs")
    return "\n".join(lines)


def answer(model, processor, image, question: str, sa_layers) -> tuple[str, Any]:
    """Greedy answer to one question about ``image``, and the configuration that produced it."""
    import torch  # here, not at the top: `visorlib --help` registers this command without loading torch

    inputs = processor.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                            images=[image])
    with torch.inference_mode():
        chosen = model(**inputs, sa_layers=sa_layers).sa_layers if sa_layers == "router" else [sa_layers]
        out = model.generate(**inputs, max_new_tokens=4, sa_layers=chosen[0] if sa_layers == "router" else sa_layers)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:]).strip(), chosen[0]


def run_demo(model_name: str = "visor-synthdoc-tiny", examples: int = 2, pages: int = 30,
             seed: int = HELD_OUT_SEED, json_path: str | None = None, threads: int | None = 1) -> dict[str, Any]:
    """Everything ``visorlib demo`` prints; returns the numbers (also written to ``json_path``)."""
    import torch

    from . import zoo
    from .train.synthdoc import pages as make_pages
    from .train.synthdoc import task_of

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    model = zoo.build(model_name, pretrained=True)
    processor = zoo.processor_for(model)
    if processor.tokenizer is None:
        raise ValueError(f"{model_name}: the shipped checkpoint has no tokenizer.json")
    params = sum(p.numel() for p in model.parameters())
    print(f"visorlib demo: {model_name}, CPU-trained weights shipped with visorlib ({params / 1e6:.2f} M parameters), "
          f"offline, {torch.get_num_threads()} thread(s); loaded in {time.perf_counter() - started:.1f} s")
    task = task_of(model)
    tile = model.cfg.vision.image_size
    shown = configurations_to_show(model)
    if len(shown) > 1:  # the cheapest, the full configuration and the router
        shown = [shown[0], *[c for c in shown[1:] if c[1] == model.plan.default or c[1] == "router"]]
    for number, (image, facts, _) in enumerate(make_pages(seed, examples, tile, task), 1):
        print(f"\npage {number} ({2 * tile}x{2 * tile} px = 2x2 tiles, held-out seed {seed}): {task.describe(facts)}")
        rng = random.Random(f"demo-{number}")
        qa = {c: (q, a) for c, q, a in task.questions(facts, rng)}  # the last question of each kind
        for category in task.categories:
            question, truth = qa[category]
            print(f"  [{category}] {question}   (truth: {truth})")
            for label, sa_layers in shown:
                reply, chosen = answer(model, processor, image, question, sa_layers)
                mark = "ok" if reply == truth else "WRONG"
                via = f" -> chose {_label(chosen)}" if sa_layers == "router" else ""
                print(f"      {label:14s}{via:22s} {reply!r:24s} {mark}")
    counts = Counter(c for c, _, _ in task.questions(task.drill, random.Random(0)))
    per_page = ", ".join(f"{counts[c]} {c}" for c in task.categories) + " questions each; "
    print(f"\nheld-out accuracy: {pages} pages of seed {seed} ({per_page}greedy exact match), "
          "language-model prefill FLOPs per sample, time on this machine")
    rows = evaluate(model, processor, seed, pages, task)
    kinds = [*task.categories, "all"]
    print(f"  {'configuration':16s} " + " ".join(f"{k:>6s}" for k in kinds) + f" {'LLM MFLOPs':>11s} {'time':>7s}")
    for row in rows:
        print(f"  {row['label']:16s} " + " ".join(f"{row['accuracy'][k]:6.2f}" for k in kinds)
              + f" {row['gflops_per_sample'] * 1e3:11.2f} {row['seconds']:6.2f}s")
    router = next((r for r in rows if r["label"] == "router"), None)
    if router is not None:
        print("  router choices: " + "; ".join(f"{c}: {dict(sorted(v.items()))}" for c, v in router["choices"].items()))
        print("\n" + at_a_glance(rows))
    result = {"model": model_name, "seed": seed, "pages": pages, "threads": torch.get_num_threads(), "rows": rows,
              "seconds": time.perf_counter() - started}
    from .cli_args import seconds_since_process_start

    waited = seconds_since_process_start()  # the user also waited for Python, torch and visorlib to load
    print(f"\ndone in {result['seconds']:.1f} s" + (f" ({waited:.1f} s since the command started, imports "
                                                     "included)" if waited is not None else ""))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def add_demo_parser(sub) -> argparse.ArgumentParser:
    """Register ``visorlib demo`` on the CLI's subparsers."""
    p = sub.add_parser("demo", help="the shipped CPU-trained VISOR model: the cheap configuration, the full one and the router (offline)")
    p.add_argument("--model", default="visor-synthdoc-tiny", help="a synthdoc zoo card with shipped weights")
    p.add_argument("--examples", type=int, default=2, help="example pages whose answers are printed")
    p.add_argument("--pages", type=int, default=30, help="held-out pages scored")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="seed of the held-out pages")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared small machine)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=_cmd_demo)
    return p


def _cmd_demo(args: argparse.Namespace) -> None:
    if args.examples < 0 or args.pages < 1 or args.threads < 1:
        raise ValueError("demo: --examples must be >= 0, --pages >= 1 and --threads >= 1")
    from .cli_args import check_output_file

    check_output_file(args.json, "--json")  # before the demo runs, not after it
    run_demo(args.model, args.examples, args.pages, args.seed, args.json, args.threads)
