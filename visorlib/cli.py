"""The ``visorlib`` command: list, info, generate, profile, train, data, eval, analyze, demo, serve.

``visorlib profile llava-ov-0.5b`` is the offline main job: it builds the real-size architecture
with random weights (no download), feeds it one image, and reports visual tokens, parameters,
analytic FLOPs and the measured prefill time on this machine.

Every error a user can cause (a bad argument, file, card, recipe, checkpoint or image) ends the
command with one line on stderr, ``visorlib: error: ...``, and exit status 2; no traceback.
Arguments, output paths and input images are checked before any model is built, so a typo costs
seconds, not the length of a profile or a training run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import yaml

from .cli_args import UsageError, check_device, check_output_file, int_between, non_negative_int, positive_int

# torch and the model code are imported inside the commands, not here: `visorlib --help` and a
# mistyped argument answer at once, and a Ctrl-C while they load reaches main()'s handler.
DTYPES = ("bfloat16", "float16", "float32")


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` value (one of :data:`DTYPES`)."""
    import torch

    return getattr(torch, name)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the rule for every error of the command)."""

    def error(self, message: str):
        command = self.prog.removeprefix("visorlib").strip()
        self.exit(2, f"visorlib: error: {command + ': ' if command else ''}{message} (see '{self.prog} --help')\n")


def load_image(path: str):
    """``--image`` files through :func:`visorlib.processing.files.open_image` (regular files only,
    bounded size, fully decoded here, so a truncated file fails naming it)."""
    from .processing.files import open_image

    return open_image(path)


def parameter_breakdown(model) -> dict[str, int]:
    """Parameters per component (a tied head is counted once, under the embedding).

    ``visor_blocks`` (a VISOR model only) is everything VISOR adds to the dense model:
    cross-attention blocks and the router (a widened packing projector counts under ``projector``).
    """
    decoder = model.decoder
    parts = {
        "vision_tower": sum(p.numel() for p in model.vision_tower.parameters()),
        "projector": sum(p.numel() for p in model.projector.parameters())
        + (model.image_newline.numel() if model.image_newline is not None else 0),
        "embed_tokens": decoder.embed_tokens.weight.numel(),
        "decoder_layers": sum(p.numel() for p in decoder.layers.parameters()) + decoder.norm.weight.numel(),
        "lm_head": 0 if decoder.lm_head is None else decoder.lm_head.weight.numel(),
    }
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    if getattr(model.cfg, "visor", None) is not None:
        parts["visor_blocks"] = total - sum(parts.values())
    parts["total"] = total
    return parts


def cmd_list(args: argparse.Namespace) -> None:
    from . import zoo

    broken = []
    for name in zoo.list_models(args.pattern):
        try:
            cfg = zoo.get_config(name)
        except (ValueError, KeyError, OSError, ImportError) as err:  # one bad card must not hide the others
            broken.append(f"visorlib: warning: card {name!r} skipped: {error_line(err)}")
            continue
        print(f"{name:24s} {cfg.description}")
    for line in broken:
        print(line, file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> None:
    from . import zoo
    from .registry import family_of
    from .utils import human

    cfg = zoo.get_config(args.name)
    model = zoo.build(args.name, device="meta")
    v, d = cfg.vision, cfg.decoder
    print(f"{cfg.name}: {cfg.description}")
    print(f"  family          {cfg.family}")
    print(f"  hub id          {cfg.hub_id or '-'}")
    geometry = family_of(cfg).geometry(cfg)
    print(f"  vision tower    {v.kind}: {v.num_layers} layers, width {v.hidden_size}, {geometry}")
    print(f"  decoder         {d.kind}: {d.num_layers} layers, width {d.hidden_size}, heads {d.num_heads}/{d.num_kv_heads} kv, "
          f"vocab {d.vocab_size}, {'tied' if d.tie_word_embeddings else 'untied'} head")
    print("  parameters")
    for part, count in parameter_breakdown(model).items():
        print(f"    {part:16s} {count:>15,d}  ({human(count)})")


def default_profile_image():
    """The embedded default input: one synthetic 384x384 page (one tile + base -> 1485 tokens)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (384, 384), (245, 240, 230))
    draw = ImageDraw.Draw(image)
    for row in range(12):
        draw.text((16, 16 + 30 * row), f"visorlib profile line {row:02d}: 0123456789", fill=(20, 20, 20))
    draw.rectangle((250, 250, 360, 360), outline=(200, 30, 30), width=4)
    return image


def cmd_profile(args: argparse.Namespace) -> None:
    import torch

    from . import zoo
    from .flops import flops
    from .profiling import (
        format_table,
        paper_reduction_rows,
        plot_flops_vs_visual_tokens,
        profile_configurations,
        spec_rows,
    )
    from .registry import family_of
    from .visor.plan import LayerPlan
    from .visor.reduction import PRE_LLM, ReductionSpecError, parse_reduction

    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = zoo.get_config(args.name)
    if args.tiny:
        cfg = cfg.tiny()
    if args.image:
        image, label = load_image(args.image).convert("RGB"), args.image
    else:
        image, label = default_profile_image(), "embedded 384x384 default image"
    specs = []
    for text in args.token_reduction:
        try:
            spec = json.loads(text)
            parsed = parse_reduction(spec, "--token-reduction")
        except json.JSONDecodeError as err:
            raise UsageError(f"--token-reduction {text!r} is not JSON ({err.msg}); e.g. "
                             "'{\"method\": \"visionzip\", \"keep\": 128}'") from err
        except ReductionSpecError as err:
            raise UsageError(str(err)) from err
        specs.append((spec, parsed))
    pre_llm_ok = family_of(cfg).pre_llm_tokens is not None  # a family that runs pre-LLM methods
    for spec, parsed in specs:
        if not pre_llm_ok and any(r.where == PRE_LLM for r in parsed):
            raise UsageError(f"--token-reduction {json.dumps(spec)}: {cfg.name} runs no pre-LLM method "
                             "(fastv and pyramiddrop work on every family)")
    if args.plot:
        print(f"wrote {plot_flops_vs_visual_tokens(cfg, args.plot)}")
    processor = family_of(cfg).processor(cfg, None)
    # The processor builds the prompt around the image; text tokens are random ordinary ids.
    n_text = args.text_tokens
    ids, vision, tiles = processor.profile_inputs(image, n_text)
    n_visual = int((ids == cfg.tokens.image_token_id).sum())

    def prompt_for(spec):
        return processor.profile_inputs(image, n_text, token_reduction=spec)[0]

    _check_reductions_fit(specs, prompt_for, cfg, n_visual)  # before minutes of building and profiling
    dtype = torch_dtype(args.dtype)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 - progress goes to stderr
    log(f"building {cfg.name} at {'TINY' if args.tiny else 'real'} size with RANDOM weights (no checkpoint; "
        "outputs are meaningless, timings and counts are real)...")
    started = time.perf_counter()
    model = zoo.instantiate(cfg, device=args.device, dtype=dtype).eval()
    build_s = time.perf_counter() - started
    ids, vision = ids.to(args.device), {k: v.to(args.device) for k, v in vision.items()}
    size = list(image.size[::-1])
    report = flops(cfg, n_visual=n_visual, n_text=n_text, tiles=tiles)
    plan = LayerPlan(cfg.decoder.num_layers, cfg.visor)
    reductions = paper_reduction_rows(plan, pre_llm_ok, cfg.feature_grid_size**2) if args.paper_reductions else []
    for spec, _ in specs:
        reductions += spec_rows(plan, spec)
    table = profile_configurations(model, ids, vision, tiles, args.repeats, log=log, reductions=reductions,
                                   prompt_for=prompt_for)
    result = {
        "model": cfg.name,
        "weights": f"random ({'tiny test-size' if args.tiny else 'real-size'} architecture, no checkpoint)",
        "image": label,
        "image_size_hw": size,
        "tiles": tiles,
        "visual_tokens": n_visual,
        "text_tokens": n_text,
        "device": str(args.device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "parameters": parameter_breakdown(model),
        "prefill_flops_default_configuration": {**report.components, "total": report.total},
        "kv_cache_bytes_bf16": report.kv_cache_bytes,
        "build_seconds": round(build_s, 2),
        "vision_seconds": round(table["vision_seconds"], 3),
        "configurations": table["rows"],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    _print_profile(result, format_table(table))


def _check_reductions_fit(specs, prompt_for, cfg, n_visual: int) -> None:
    """Refuse a ``--token-reduction`` this input cannot satisfy (a ``keep`` count above the visual
    tokens it has), before any configuration is profiled rather than after all of them."""
    from .visor.reduction import IN_LLM, ReductionSpecError, keep_counts

    for spec, parsed in specs:
        try:
            reduced = int((prompt_for(spec) == cfg.tokens.image_token_id).sum())  # checks pre-LLM counts
            for reducer in parsed:
                if reducer.where == IN_LLM:
                    keep_counts(reducer, [reduced], cfg.decoder.num_layers)
        except ReductionSpecError as err:
            raise UsageError(f"--token-reduction {json.dumps(spec)}: {err} (this input has {n_visual} visual "
                             "tokens before reduction)") from None


def _print_profile(r: dict, table: str) -> None:
    from .utils import human

    print(f"\n{r['model']} -- {r['weights']}")
    print(f"input: {r['image']} {r['image_size_hw'][0]}x{r['image_size_hw'][1]} -> {r['tiles']} tiles/patches, "
          f"{r['visual_tokens']} visual tokens + {r['text_tokens']} text tokens")
    print("\nparameters")
    for part, count in r["parameters"].items():
        print(f"  {part:16s} {count:>15,d}  ({human(count)})")
    print("\nanalytic prefill FLOPs (default configuration)")
    flops_ = r["prefill_flops_default_configuration"]
    for part, value in flops_.items():
        print(f"  {part:30s} {human(value, 'FLOP'):>14s}  {100 * value / flops_['total']:5.1f} %")
    print(f"KV cache after prefill (bf16): {human(r['kv_cache_bytes_bf16'], 'B')}")
    print(f"\nmeasured on {r['device']} ({r['dtype']}, {r['threads']} threads): vision tower + projector "
          f"{r['vision_seconds']:.2f} s; language-model prefill per configuration:\n")
    print(table)


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from . import processor_for, zoo

    check_device(args.device)
    images = [load_image(path) for path in args.image]  # before the (possibly large) model is loaded
    dtype = torch_dtype(args.dtype)
    if args.model in zoo.list_models():
        model = zoo.build(args.model, pretrained=True, dtype=dtype, device=args.device)
    else:
        model = zoo.from_pretrained(args.model, dtype=dtype, device=args.device)
    sa_layers = _generate_configuration(model, args.sa_layers)
    if args.tokenizer is not None:
        processor = processor_for(model, args.tokenizer)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "images only" fallback warning becomes the error below
            processor = processor_for(model)
    if processor.tokenizer is None:
        raise UsageError(f"--model {args.model}: no tokenizer found (no tokenizer.json in the checkpoint folder, "
                         "none in the Hub cache for the card's hub_id); generate needs one to read the prompt")
    content = _generate_content(args.prompt, len(images))
    inputs = processor.chat([{"role": "user", "content": content}], images=images or None)
    inputs = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, sa_layers=sa_layers)
    print(processor.decode(out[0, inputs["input_ids"].shape[1]:]))


def _generate_content(prompt: str, n_images: int) -> list[dict]:
    """The user turn of ``generate``: each image before the prompt, unless the prompt places them.

    A prompt that writes ``<image>`` itself decides where the images go (each one becomes an image
    part of the turn, so every family's chat template renders it); it must then place every
    ``--image`` exactly once. Adding the images' own parts as well counted them twice.
    """
    from .processing.chat import IMAGE_TOKEN

    pieces = prompt.split(IMAGE_TOKEN)
    placed = len(pieces) - 1
    if placed and placed != n_images:
        raise UsageError(f"--prompt holds {placed} {IMAGE_TOKEN} placeholder(s) but {n_images} --image file(s) "
                         f"were given; give one --image per {IMAGE_TOKEN}, or leave {IMAGE_TOKEN} out of the prompt "
                         "(the images then go before it)")
    if not placed:
        return [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    content: list[dict] = []
    for index, piece in enumerate(pieces):
        if index:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return content


def _generate_configuration(model, spec: str | None):
    """``--sa-layers`` as ``generate``'s ``sa_layers``: None (the card's default) or one configuration."""
    if spec is None:
        return None
    from .eval.runner import parse_configs

    try:
        configs = parse_configs(model, spec)
    except ValueError as err:
        raise UsageError(str(err).replace("--configs", "--sa-layers")) from None
    if len(configs) != 1:
        raise UsageError(f"--sa-layers {spec!r}: names {len(configs)} configurations; generate runs one "
                         "(e.g. '1,3', 'none', 'router' or 'default')")
    return None if configs[0].sa_layers == "all" else configs[0].sa_layers


def cmd_train(args: argparse.Namespace) -> None:
    from .train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)

    def say(line: str) -> None:
        """What the seconds before the progress bar go to (shown with it: ``logging.progress``)."""
        if recipe.logging.progress:
            print(f"visorlib train: {line}", file=sys.stderr, flush=True)

    say("loading torch and the trainer...")
    from .train.trainer import Trainer

    trainer = Trainer(recipe, resume=args.resume, allow_recipe_change=args.allow_recipe_change, status=say)
    try:
        if recipe.training.stage == "router":
            from .eval.held_out import held_out_task_accuracy
            from .train.router import run_router_stage

            print(json.dumps(run_router_stage(recipe, trainer, held_out_task_accuracy), indent=2))
            return
        if trainer.step:
            print(f"resumed at step {trainer.step}", file=sys.stderr)
        if trainer.step >= recipe.training.max_steps:
            print(f"visorlib train: nothing to train: the checkpoint in {trainer.ckpt_dir} is at step {trainer.step} "
                  f"= training.max_steps; raise training.max_steps (--set training.max_steps=N) to continue",
                  file=sys.stderr)
            return
        logs = trainer.train()
        if trainer.dist.main and logs:
            print(f"trained to step {trainer.step}: loss {logs[-1]['loss']:.4f}; checkpoints in {trainer.ckpt_dir}")
    finally:
        trainer.close()


def cmd_synth(args: argparse.Namespace) -> None:
    from . import zoo
    from .train.synth import make_synthetic_dataset

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"data synth: output {args.out} exists and is not a folder")
    cfg = zoo.get_config(args.model)
    cfg = cfg.tiny() if args.tiny else cfg
    path = make_synthetic_dataset(args.out, cfg, args.samples, args.image_size, args.seed)
    print(f"wrote {path} ({args.samples} pages, 3 questions each) and {Path(args.out) / 'tokenizer.json'}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="visorlib", description="VISOR vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list zoo models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. '*0.5b'")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("info", help="architecture and parameters of a zoo model (no weights needed)")
    p.add_argument("name")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("generate", help="answer a prompt about images with a checkpoint")
    p.add_argument("--model", required=True, help="zoo name (its Hub weights), Hub id, or local folder")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sa-layers", default=None,
                   help="VISOR configuration: self-attention layers '1,3', 'none' (cross-attention only), "
                        "'router' or 'default' (default: the card's)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder, tokenizer.json or Hub id "
                   "(default: the checkpoint's folder, then the card's hub_id)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("profile", help="real-size model, random weights: tokens, parameters, FLOPs, prefill time")
    p.add_argument("name")
    p.add_argument("--image", help="image file (default: an embedded 384x384 page)")
    p.add_argument("--text-tokens", type=positive_int, default=64, help="text tokens of the prompt (>= 1)")
    p.add_argument("--repeats", type=positive_int, default=1)
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--tiny", action="store_true", help="use the card's tiny test-size variant (smoke test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--plot", help="also save the FLOPs-vs-visual-tokens plot here (needs matplotlib)")
    p.add_argument("--token-reduction", action="append", default=[], metavar="JSON",
                   help="add rows under this token-reduction spec (dense plan, and a VISOR model's smallest "
                        "configuration), e.g. '{\"method\": \"visionzip\", \"keep\": 128}'; repeatable")
    p.add_argument("--paper-reductions", action="store_true",
                   help="add a row per token-reduction method at the paper's settings, and VISOR 2-SA + VisionZip")
    p.set_defaults(func=cmd_profile)
    p = sub.add_parser("train", help="train with a YAML recipe (one process, or under torchrun)")
    p.add_argument("recipe")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in checkpoint.dir")
    p.add_argument("--allow-recipe-change", action="store_true",
                   help="with --resume: accept a recipe that differs from the checkpoint's (beyond max_steps, logging, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set training.max_steps=10")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    from .train.synth import MAX_IMAGE_SIZE

    p = data_sub.add_parser("synth", help="write the synthetic fine-grained VQA dataset")
    p.add_argument("out")
    p.add_argument("--model", default="visor-llava-ov-0.5b", help="card whose token ids the tokenizer uses")
    p.add_argument("--tiny", action="store_true", help="for the card's tiny variant")
    p.add_argument("--samples", type=positive_int, default=200)
    p.add_argument("--image-size", type=int_between(32, MAX_IMAGE_SIZE), default=96, help="page side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)
    from .train.synthdoc import add_data_parser

    add_data_parser(data_sub)
    from .eval.cli import add_eval_parser

    add_eval_parser(sub)
    from .analysis.cli import add_analyze_parser

    add_analyze_parser(sub)
    from .demo import add_demo_parser

    add_demo_parser(sub)
    from .serve.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


# What a user's input can raise: visorlib's own errors (ConfigError, InputError, DataError are
# ValueErrors; CheckpointError is a RuntimeError), unknown card names (KeyError), files (OSError),
# YAML, and a missing optional package. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, RuntimeError, OSError, yaml.YAMLError, ImportError)


def error_line(err: BaseException) -> str:
    """``err`` as the one line the command prints (a KeyError's message without its quotes)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``visorlib`` command: 0 on success, 2 on any user error (one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)  # inside: building the parsers imports the data commands' code
        args.func(args)
    except USER_ERRORS as err:
        print(f"visorlib: error: {error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # the trainer's says where it stopped and how to resume
        print(f"visorlib: error: {error_line(err) if str(err) else 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
