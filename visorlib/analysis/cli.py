"""The ``visorlib analyze`` subcommand: its arguments, its output folder and what it runs.

``visorlib analyze MODEL --data FILE_OR_TASK [--limit N] [--out DIR] [--suggest-plan]`` writes
``analysis.json`` (every number), ``attention.png``, ``cka.png``, ``layer_drop.png`` (without
matplotlib: JSON only, and a one-line note) and with ``--suggest-plan`` ``plan.yaml``.

The output folder may be new, empty, or one this command wrote before: it keeps a manifest
(``.visorlib-analyze``) of the files it wrote, and refuses to replace any other file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MANIFEST = ".visorlib-analyze"
OUTPUTS = ("analysis.json", "attention.png", "cka.png", "layer_drop.png", "plan.yaml")


def add_analyze_parser(sub) -> argparse.ArgumentParser:
    """Register ``analyze`` on the ``visorlib`` command's subparsers."""
    from ..cli_args import non_negative_int, positive_int

    p = sub.add_parser("analyze", help="attention shares, visual-token CKA and layer-drop sensitivity (paper §3)")
    p.add_argument("model", help="zoo name (its weights), checkpoint folder or Hub id")
    p.add_argument("--data", action="append", required=True,
                   help="file.json[l] (LLaVA format), a task or task=folder, as for 'visorlib eval'; repeat for several")
    p.add_argument("--limit", type=positive_int, help="first N samples of each dataset")
    p.add_argument("--out", default="analysis", help="output folder (default: ./analysis)")
    p.add_argument("--suggest-plan", action="store_true", help="also write plan.yaml, a suggested 'visor:' section")
    p.add_argument("--sa-layers", default=None,
                   help="VISOR models: the configuration measured, e.g. '1,3' or 'all' (default: the card's)")
    p.add_argument("--drop-subsets", type=non_negative_int, default=8,
                   help="random layer-drop subsets besides the unmodified model (0: skip layer drop)")
    p.add_argument("--cka", choices=("paper", "unbiased"), default="paper",
                   help="HSIC estimator: the paper's (appendix M, biased) or the unbiased one")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--chunk", type=positive_int, default=64, help="queries per attention block (memory bound)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the layer-drop subsets")
    p.add_argument("--metric", default="exact_match", help="metric of local rows without a 'metric' field")
    p.add_argument("--image-root", help="folder local image paths are relative to (default: the file's folder)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_analyze)
    return p


def parse_sa_layers(text: str | None) -> object:
    """``--sa-layers``: one configuration in the ``sa_layers`` grammar (not ``router``: one configuration is measured)."""
    from ..cli_args import UsageError
    from ..visor.request import parse_configuration

    try:
        configuration = parse_configuration(text, "--sa-layers")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if configuration == "router":
        raise UsageError("--sa-layers router: the analysis measures one fixed configuration; name its layers")
    return configuration


def prepare_folder(out: Path, names: list[str]) -> None:
    """Create ``out`` or check that writing ``names`` there replaces only this command's own files.

    Raises:
        UsageError: ``out`` is a file, or holds a file of one of ``names`` that this command did not write.
    """
    from ..cli_args import UsageError

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder")
    owned = _owned(out)
    foreign = [n for n in names if (out / n).exists() and n not in owned]
    if foreign:
        raise UsageError(f"--out {out}: would overwrite {', '.join(foreign)}, which 'visorlib analyze' did not write; "
                         "choose another folder")
    out.mkdir(parents=True, exist_ok=True)


def _owned(out: Path) -> set[str]:
    """Files the manifest says this command wrote (a manifest it cannot read is refused)."""
    from ..cli_args import UsageError

    manifest = out / MANIFEST
    if not manifest.exists():
        return set()
    try:
        owned = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        owned = None
    if not isinstance(owned, list) or not all(isinstance(n, str) for n in owned):
        raise UsageError(f"--out {out}: {MANIFEST} was not written by 'visorlib analyze'; choose another folder")
    return set(owned)


def _record(out: Path, written: list[str]) -> None:
    (out / MANIFEST).write_text(json.dumps(sorted(_owned(out) | set(written))))


def cmd_analyze(args: argparse.Namespace) -> None:
    """Run the analysis and write its outputs."""
    import torch

    from ..cli_args import check_device
    from ..eval.runner import _load_model
    from ..zoo import processor_for
    from .plots import have_matplotlib, plot_report
    from .run import analyze, load_samples, to_json
    from .suggest import plan_yaml

    out = Path(args.out)
    sa_layers = parse_sa_layers(args.sa_layers)
    prepare_folder(out, list(OUTPUTS))  # before any work: a refused folder costs nothing
    check_device(args.device)
    samples = load_samples(args.data, args.limit, args.metric, args.image_root)  # before the model
    model = _load_model(args.model, args.device, getattr(torch, args.dtype))
    report = analyze(model, processor_for(model), samples, sa_layers=sa_layers, batch_size=args.batch_size,
                     chunk=args.chunk, cka_estimator=args.cka, drop_subsets=args.drop_subsets, seed=args.seed,
                     max_new_tokens=args.max_new_tokens, suggest=args.suggest_plan, progress=not args.no_progress)
    report["data"] = [str(d) for d in args.data]
    written = ["analysis.json"]
    (out / "analysis.json").write_text(json.dumps(to_json(report), indent=1))
    if have_matplotlib():
        written += [p.name for p in plot_report(to_json(report), out)]
    else:
        print("visorlib analyze: matplotlib is not installed; wrote JSON only (pip install matplotlib for figures)",
              file=sys.stderr)
    if args.suggest_plan:
        (out / "plan.yaml").write_text(plan_yaml(report["suggested_plan"]["visor"],
                                                 f"model {report['model']}, data {', '.join(report['data'])}"))
        written.append("plan.yaml")
    _record(out, written)
    for name in written:
        print(f"wrote {out / name}", file=sys.stderr)
    if args.suggest_plan:
        print((out / "plan.yaml").read_text(), end="")
