"""The ``visorlib eval`` subcommand: its arguments and what it runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """Register ``eval`` on the ``visorlib`` command's subparsers."""
    from ..cli_args import positive_int

    p = sub.add_parser("eval", help="accuracy, FLOPs, KV bytes and time per configuration and for the router")
    p.add_argument("model", help="zoo name (its Hub weights), checkpoint folder or Hub id")
    p.add_argument("--data", action="append", required=True,
                   help="file.json[l] (LLaVA format with 'answers'), a task (docvqa_val, chartqa, ...) or "
                        "task=folder (a save_to_disk copy); repeat for several")
    p.add_argument("--configs", default="default",
                   help="'default', 'all', 'router', 'none' or layer lists like '1,4'; several separated by ';'")
    p.add_argument("--token-reduction", action="append", default=[], metavar="JSON",
                   help="also evaluate every configuration under this token-reduction spec, e.g. "
                        "'{\"method\": \"visionzip\"}' (docs/token-reduction.md); repeat for several")
    p.add_argument("--limit", type=positive_int, help="first N samples of each dataset")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--mix-configs", action="store_true",
                   help="mix configurations in one batch (faster; times become shares of mixed batches)")
    p.add_argument("--metric", default="exact_match", help="metric of local rows without a 'metric' field")
    p.add_argument("--image-root", help="folder local image paths are relative to (default: the file's folder)")
    p.add_argument("--allow-outside-image-root", action="store_true",
                   help="accept image paths that leave the image root ('..', absolute paths, links)")
    p.add_argument("--tokenizer", help="tokenizer folder, tokenizer.json or Hub id (default: the checkpoint's "
                                       "folder, then the card's hub_id)")
    p.add_argument("--max-skip-fraction", type=fraction, default=0.1,
                   help="exit with an error when more than this share of the samples is skipped as broken "
                        "(default 0.1, as training's data.max_skip_fraction)")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="what a broken row does")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--predictions", help="predictions JSONL, a cache: a line is reused only if the same checkpoint, "
                                         "dtype, configuration, sample and metric produced it; locked for the run")
    p.add_argument("--plot", help="save the accuracy-vs-FLOPs plot here (needs matplotlib)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)
    return p


def fraction(text: str) -> float:
    """argparse type: a number between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def cmd_eval(args: argparse.Namespace) -> None:
    """Run the evaluation and print the table."""
    import logging

    import torch

    from ..cli_args import UsageError, check_device, check_output_file
    from ..visor.reduction import ReductionSpecError, parse_reduction
    from .cache import check_outputs
    from .datasets import load_data
    from .runner import EvalIncomplete, evaluate

    reductions = []
    for text in args.token_reduction:  # bad specs before the data and the model are loaded
        try:
            reductions.append(json.loads(text))
            parse_reduction(reductions[-1], "--token-reduction")
        except json.JSONDecodeError as err:
            raise UsageError(f"--token-reduction {text!r} is not JSON ({err.msg})") from err
        except ReductionSpecError as err:
            raise UsageError(str(err)) from err

    for flag, path in (("--json", args.json), ("--predictions", args.predictions), ("--plot", args.plot)):
        check_output_file(path, flag)  # before the evaluation, not after it
    check_device(args.device)
    data = [load_data(spec, args.metric, args.image_root, args.allow_outside_image_root)
            for spec in args.data]  # before the model is loaded
    check_outputs([("--json", args.json, "report"), ("--predictions", args.predictions, "predictions"),
                   ("--plot", args.plot, "plot")], data)
    logging.basicConfig(level=logging.WARNING, format="visorlib eval: %(message)s")
    try:
        report = evaluate(args.model, data, configs=args.configs, limit=args.limit, batch_size=args.batch_size,
                          predictions=args.predictions, max_new_tokens=args.max_new_tokens, on_error=args.on_error,
                          mix_configs=args.mix_configs, metric=args.metric, image_root=args.image_root,
                          device=args.device, dtype=getattr(torch, args.dtype), progress=not args.no_progress,
                          token_reductions=reductions, tokenizer=args.tokenizer,
                          max_skip_fraction=args.max_skip_fraction,
                          allow_outside_image_root=args.allow_outside_image_root)
    except EvalIncomplete as err:
        if err.report is not None and err.report.rows:
            print(err.report.table())  # what was evaluated, before the error that makes the exit non-zero
        raise
    _print_reuse(report)
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        print(f"wrote {report.plot(args.plot)}", file=sys.stderr)


def _print_reuse(report) -> None:
    """Say what the predictions file gave: a number reported from cached lines must be visible as such."""
    info = report.predictions
    if info.get("file"):
        stale = f" ({info['stale']} line(s) from another checkpoint, data, metric or setting not reused)" \
            if info["stale"] else ""
        print(f"reused {info['reused']} of {info['total']} predictions from {info['file']}, generated "
              f"{info['generated']}{stale}", file=sys.stderr)
