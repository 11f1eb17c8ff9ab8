"""A checked request -> the model's inputs, its VISOR configuration and its token budget.

This runs in the web server's worker threads, not in the scheduler: tokenizing and preprocessing
images of one request must not stall the decode steps of the others, and every way a request can
be wrong (a configuration outside the plan, a bad reduction spec, a prompt longer than the
context) surfaces here as a 400 before the request takes a place in the queue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..eval.runner import ROUTER, parse_configs
from ..processing.processor import ROUTE_TOKEN
from ..validation import InputError
from ..visor.reduction import ReductionSpecError, parse_reduction
from .protocol import APIError, ChatRequest


@dataclass
class Prepared:
    """One request, ready for the scheduler.

    Attributes:
        request: The checked request (``max_tokens`` resolved).
        inputs: ``input_ids`` (1-D, unpadded) and the family's vision tensors for this request alone.
        sa_layers: What the prefill runs: a list of layers, ``"router"``, or None (a dense model).
        label: The configuration as the grammar writes it (``"1,3"``, ``"none"``, ``"router"``, ``"dense"``).
        prompt_tokens, visual_tokens: Token counts of the prompt (visual tokens included in both).
    """

    request: ChatRequest
    inputs: dict[str, Any]
    sa_layers: Any
    label: str
    prompt_tokens: int
    visual_tokens: int

    @property
    def reduction_key(self) -> str:
        """Requests are prefilled together only under the same token reduction."""
        return repr(self.request.token_reduction)


def reserved_markers(processor) -> tuple[str, ...]:
    """Strings a client's text may not contain: the processor's placeholders and the routing marker."""
    return tuple(dict.fromkeys((processor.image_token, processor.video_token, processor.data_image,
                                processor.data_video, ROUTE_TOKEN)))


def configuration(model, sa_layers: Any) -> tuple[Any, str]:
    """The body's ``sa_layers`` as ``(what the prefill runs, label)``, parsed by visorlib's one grammar.

    Raises:
        APIError: A configuration outside the model's plan, or a spec naming several.
    """
    spec = "default" if sa_layers is None else [sa_layers] if isinstance(sa_layers, list) else sa_layers
    try:
        configs = parse_configs(model, spec)
    except (ValueError, TypeError, AttributeError) as err:
        # parse_configs words its errors for --configs; say them in the request's terms.
        message = re.sub(r"^--configs .*?: (sa_layers: )?", "", str(err))
        raise APIError(f"'sa_layers' {sa_layers!r}: {message}", "sa_layers") from None
    if len(configs) != 1:
        raise APIError(f"'sa_layers' {sa_layers!r} names {len(configs)} configurations; a request runs one "
                       f"(e.g. 'none', 'router', 'default' or a list of layers)", "sa_layers")
    chosen = configs[0]
    if chosen.sa_layers == "all":  # a dense model: its one configuration
        return None, chosen.label
    return (ROUTER if chosen.sa_layers == ROUTER else list(chosen.sa_layers)), chosen.label


def prepare(model, processor, request: ChatRequest, images: list, max_model_len: int,
            default_max_tokens: int) -> Prepared:
    """Tokenize and preprocess ``request`` and resolve its budget.

    Args:
        model: The served model.
        processor: Its processor (with a tokenizer).
        request: The checked request.
        images: Its decoded images, in placeholder order.
        max_model_len: Longest prompt + answer served (``--max-model-len``).
        default_max_tokens: ``max_tokens`` when the request gives none (cut to what fits).

    Raises:
        APIError: Naming the field at fault.
    """
    sa_layers, label = configuration(model, request.sa_layers)
    try:
        parse_reduction(request.token_reduction)
    except ReductionSpecError as err:
        raise APIError(f"'token_reduction': {err}", "token_reduction") from None
    try:
        inputs = processor.chat(request.messages, images=images or None, token_reduction=request.token_reduction)
    except (InputError, ValueError) as err:
        param = "token_reduction" if request.token_reduction is not None and "reduction" in str(err) else "messages"
        raise APIError(f"'{param}': {err}", param) from None
    ids = inputs.pop("input_ids")[0]
    inputs.pop("attention_mask", None)
    inputs.pop("batch_num_images", None)  # recomputed when requests are batched together
    inputs["input_ids"] = ids
    length = int(ids.shape[0])
    if length >= max_model_len:
        raise APIError(f"the prompt is {length} tokens (visual tokens included); this server's context is "
                       f"{max_model_len} tokens (--max-model-len)", "messages", code="context_length_exceeded")
    room = max_model_len - length
    if request.max_tokens is None:
        request.max_tokens = min(default_max_tokens, room)
    elif request.max_tokens > room:
        raise APIError(f"'max_tokens' is {request.max_tokens} but the prompt is {length} tokens and the context "
                       f"{max_model_len} (--max-model-len): at most {room} tokens fit", "max_tokens",
                       code="context_length_exceeded")
    visual = int(model.language_model.visual_token_mask(ids[None]).sum())
    return Prepared(request, inputs, sa_layers, label, length, visual)

