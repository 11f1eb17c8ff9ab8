"""``visorlib serve MODEL``: load the model, check the flags, run uvicorn on the app.

Everything a flag can get wrong (a missing media root, a non-loopback address without an API key
is only warned about) is checked before the model is loaded, and the model is loaded before the
port is opened, so a server that answers ``/ready`` can serve. SIGTERM / Ctrl-C is uvicorn's
graceful shutdown: it stops accepting connections, lets in-flight requests finish for up to
``--graceful-timeout`` seconds, then the scheduler stops and answers what is left with a 503.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``visorlib`` command's subparsers."""
    from ..cli_args import non_negative_int, positive_int

    p = sub.add_parser("serve", help="OpenAI-compatible server with continuous batching (per-request sa_layers)")
    p.add_argument("model", help="zoo name (its shipped or Hub weights), checkpoint folder or Hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=non_negative_int, default=8000)
    p.add_argument("--served-name", help="the model name clients send (default: MODEL as given)")
    p.add_argument("--max-batch", type=positive_int, default=32, help="most sequences decoded together")
    p.add_argument("--max-queue", type=positive_int, default=256, help="most waiting requests; then HTTP 429")
    p.add_argument("--max-model-len", type=positive_int,
                   help="longest prompt + answer in tokens (default: the card's max_position_embeddings)")
    p.add_argument("--default-max-tokens", type=positive_int, default=256,
                   help="max_tokens of a request that gives none")
    p.add_argument("--api-key", default=os.environ.get("VISORLIB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $VISORLIB_API_KEY, else none)")
    p.add_argument("--media-root", help="folder local image paths may be read from (default: none allowed)")
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) image URLs of --remote-host hosts")
    p.add_argument("--remote-host", action="append", default=[], help="host name remote images may come from")
    p.add_argument("--max-body-bytes", type=positive_int, default=32 << 20)
    p.add_argument("--max-image-bytes", type=positive_int, default=10 << 20)
    p.add_argument("--max-image-pixels", type=positive_int, default=1 << 26)
    p.add_argument("--max-images", type=positive_int, default=8, help="most images in one request")
    p.add_argument("--graceful-timeout", type=positive_int, default=30,
                   help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--tokenizer", help="tokenizer folder, tokenizer.json or Hub id (default: the checkpoint's)")
    p.add_argument("--random-weights", action="store_true",
                   help="build the zoo card's architecture with random weights (benchmarks; answers are noise)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-weights (the same seed, the same weights)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> None:
    """Load the model and serve it until SIGTERM / Ctrl-C."""
    try:
        import uvicorn
    except ImportError as err:
        raise ImportError("visorlib serve needs the serve extra: pip install 'visorlib[serve]'") from err
    import torch

    from .. import zoo
    from ..cli_args import UsageError, check_device
    from .app import ServerOptions, create_app
    from .media import MediaPolicy

    check_device(args.device)
    if args.media_root is not None and not os.path.isdir(args.media_root):
        raise UsageError(f"--media-root {args.media_root}: not a folder")
    if args.allow_remote_media and not args.remote_host:
        raise UsageError("--allow-remote-media needs at least one --remote-host (no host is trusted by default)")
    if not _is_loopback(args.host) and not args.api_key:
        print(f"visorlib serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "address can use the model", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)  # one of --dtype's choices, each a torch dtype name
    if args.random_weights:
        torch.manual_seed(args.seed)
        model = zoo.build(args.model, device=args.device, dtype=dtype)
    elif args.model in zoo.list_models():
        model = zoo.build(args.model, pretrained=True, device=args.device, dtype=dtype)
    else:
        model = zoo.from_pretrained(args.model, device=args.device, dtype=dtype)
    model.eval()
    processor = zoo.processor_for(model, args.tokenizer)
    if processor.tokenizer is None:
        raise UsageError(f"{args.model}: no tokenizer found; pass --tokenizer")
    max_len = args.max_model_len or model.cfg.decoder.max_position_embeddings
    media = MediaPolicy(media_root=args.media_root, allow_remote=args.allow_remote_media,
                        remote_hosts=frozenset(h.lower() for h in args.remote_host),
                        max_image_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels)
    options = ServerOptions(served_name=args.served_name or args.model, max_batch=args.max_batch,
                            max_queue=args.max_queue, max_model_len=max_len, default_max_tokens=args.default_max_tokens,
                            max_body_bytes=args.max_body_bytes, max_images=args.max_images, api_key=args.api_key,
                            media=media)
    app = create_app(model, processor, options)
    print(f"visorlib serve: {options.served_name} on http://{args.host}:{args.port}/v1 "
          f"(max batch {args.max_batch}, context {max_len} tokens)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout, access_log=args.log_level == "debug")
