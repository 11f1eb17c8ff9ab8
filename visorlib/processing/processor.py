"""Text + images/videos -> the tensors a LLaVA-OneVision model takes.

Mirrors transformers' ``LlavaOnevisionProcessor`` (same keys, same layouts, same ``input_ids``)
so code can move between the two. Each ``<image>`` in the text is expanded to exactly as many
copies of itself as the model will produce visual features for that image, and each ``<video>``
likewise; those counts come from :mod:`.anyres`, which the model uses too.

Which images are tiled follows HF: the image of a single-image sample gets anyres tiling; the
images of a multi-image sample get one base tile each (``batch_num_images`` tells the model).

One deliberate difference: given a *flat* list of images, HF treats every image as its own
single-image sample (it sets ``batch_num_images = [1] * len(images)``) and so tiles all of them,
even when one prompt holds several ``<image>`` placeholders. We assign flat images to samples
by their placeholder counts instead, so a two-image prompt is processed as a multi-image sample
whether its images come nested or flat. For prompts with at most one image each, and for
nested lists, the outputs are identical to HF's.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import ModelConfig
from ..hub import looks_local
from ..validation import InputError
from .chat import IM_END, IM_START, IMAGE_TOKEN, VIDEO_TOKEN, media_in_messages
from .templates import builtin_template, load_chat_template, render_chat_template
from .tokenizer import Tokenizer
from .video import decode_video, uniform_indices

ROUTE_TOKEN = "<route>"
_USER_TURN_END = re.compile(r"(<\|im_start\|>user.*?)(<\|im_end\|>)", re.DOTALL)
_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")


def _is_image(obj: Any) -> bool:
    """A single image (not a list of them): PIL, or a 2-D/3-D array or tensor."""
    return isinstance(obj, Image.Image) or (isinstance(obj, (np.ndarray, torch.Tensor)) and obj.ndim in (2, 3))


def group_images(images: Any, counts: list[int]) -> list[list[Any]]:
    """Images per sample, checked against each sample's ``<image>`` placeholder count."""
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    nested = [isinstance(item, (list, tuple)) for item in images]
    if images and all(nested):
        if len(images) != len(counts):
            raise InputError(
                f"images is a nested list of {len(images)} entries but there are {len(counts)} text samples; "
                "pass one list of images per sample (an empty list for a text-only sample)"
            )
        groups = [list(group) for group in images]
    elif any(nested):
        raise InputError("images mixes single images and lists; pass a flat list or one list per sample")
    else:
        if len(images) != sum(counts):
            raise InputError(
                f"the text holds {sum(counts)} {IMAGE_TOKEN} placeholders (per sample: {counts}) but "
                f"{len(images)} images were passed"
            )
        groups, start = [], 0
        for count in counts:
            groups.append(list(images[start : start + count]))
            start += count
    for index, (group, count) in enumerate(zip(groups, counts, strict=True)):
        if len(group) != count:
            raise InputError(
                f"sample {index} has {count} {IMAGE_TOKEN} placeholders but {len(group)} images were given for it"
            )
    return groups


def list_videos(videos: Any) -> list[Any]:
    """Videos as a list: a 4-D array/tensor, a list of frames or one file path is one video."""
    if videos is None:
        return []
    if isinstance(videos, (str, os.PathLike)):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        return list(videos) if videos.ndim == 5 else [videos]
    if not isinstance(videos, (list, tuple)):
        raise InputError(f"videos must be a video (list of frames / 4-D array) or a list of videos, got {type(videos).__name__}")
    if videos and all(_is_image(frame) for frame in videos):
        return [videos]
    return list(videos)


class ChatProcessor:
    """What every family's processor shares: tokenizer, routing token, padding, chat, decoding.

    A family's processor subclasses it and adds its image pipeline (``__call__``) and its
    placeholder expansion; ``image_token`` and ``video_token`` name its placeholder tokens. Prompts
    are rendered from the checkpoint's own chat template when it has one
    (:meth:`from_pretrained` reads it), the card's built-in template otherwise
    (:mod:`~visorlib.processing.templates`).

    Args:
        cfg: The model's configuration (token ids, image preprocessing).
        tokenizer: The model's tokenizer; may be None to preprocess pixels only.
        chat_template: A Jinja chat template (None: the built-in one ``cfg.tokens.chat_template`` names).
        chat_template_source: Where ``chat_template`` came from, for error messages.

    Raises:
        ValueError: The tokenizer's image / video placeholder ids differ from ``cfg.tokens``.
    """

    image_token = IMAGE_TOKEN
    video_token = VIDEO_TOKEN
    # How one image / video of LLaVA-style training data ("<image>") is written in this family's prompt.
    data_image = IMAGE_TOKEN
    data_video = VIDEO_TOKEN
    # How the family's chat template opens and closes a turn, and its default system prompt (if any).
    turn_open = IM_START + "{role} "
    turn_close = IM_END
    default_system: str | None = None
    # How the family's transformers video processor picks frames when asked to sample (.video).
    sample_video_indices = staticmethod(uniform_indices)

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer | None = None, chat_template: str | None = None,
                 chat_template_source: str | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        if chat_template is None:
            chat_template = builtin_template(cfg.tokens.chat_template)
            chat_template_source = f"the built-in {cfg.tokens.chat_template!r} chat template"
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source or "the chat template"
        # Frame sampling of video files (None and None: every frame, transformers' default).
        self.video_num_frames: int | None = None
        self.video_fps: float | None = None
        if tokenizer is not None:
            expected = {self.image_token: cfg.tokens.image_token_id, self.video_token: cfg.tokens.video_token_id}
            for token, token_id in expected.items():
                found = tokenizer.token_to_id(token)
                if found != token_id:
                    raise ValueError(
                        f"the tokenizer maps {token} to {found} but the model config expects {token_id} "
                        "(cfg.tokens); they must agree for visual features to land in the right places"
                    )

    @classmethod
    def from_pretrained(cls, cfg: ModelConfig, path_or_hub_id: str | os.PathLike, **kwargs: Any) -> ChatProcessor:
        """Build with the tokenizer of a local directory or Hub repository.

        A local folder's own chat template (``chat_template.jinja``, or ``chat_template`` in
        ``chat_template.json`` / ``tokenizer_config.json``) replaces the card's built-in one.

        Args:
            cfg: The model's configuration.
            path_or_hub_id: Where ``tokenizer.json`` lives (see :meth:`Tokenizer.from_pretrained`).
            **kwargs: Passed on to :meth:`Tokenizer.from_pretrained` (``revision``, ``eos_token``...).
        """
        tokenizer = Tokenizer.from_pretrained(path_or_hub_id, **kwargs)
        found = load_chat_template(path_or_hub_id) if looks_local(path_or_hub_id) else None
        return cls(cfg, tokenizer, *(found or (None, None)))

    def load_video(self, path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None):
        """A video file decoded into ``[frames, H, W, 3]`` uint8, sampled by the family's rule
        (``num_frames`` / ``fps``, default: the processor's ``video_num_frames`` / ``video_fps``)."""
        if num_frames is None and fps is None:
            num_frames, fps = self.video_num_frames, self.video_fps
        return decode_video(path, num_frames, fps, self.sample_video_indices)

    def videos_of(self, videos: Any) -> list[Any]:
        """:func:`list_videos` with every file path decoded (:meth:`load_video`)."""
        return [self.load_video(v) if isinstance(v, (str, os.PathLike)) else v for v in list_videos(videos)]

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]] | Mapping[str, Any],
                            add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt for ``messages``, rendered with this processor's chat template in a sandbox.

        Args:
            messages: ``[{"role": ..., "content": [{"type": "image"}, {"type": "text", "text": ...}]}]``;
                string content is one text part.
            add_generation_prompt: End with the assistant turn's header so the model answers next.
            **variables: More template variables (``add_vision_id=True`` for Qwen2-VL's template).

        Raises:
            ChatTemplateError: The template is refused by the sandbox or fails (naming its file).
            ValueError: Malformed messages.
        """
        if self.tokenizer is not None:
            variables = {"eos_token": self.tokenizer.eos_token, "pad_token": self.tokenizer.pad_token, **variables}
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    source=self.chat_template_source, **variables)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        videos: Any = None,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
        token_reduction: object = None,
    ) -> dict[str, Any]:
        """Tokenize prompts and preprocess their images and videos.

        Args:
            text: One prompt or a batch, with one placeholder (``image_token`` / ``video_token``)
                where each image / video goes.
            images: The images, in placeholder order (the forms :meth:`preprocess` accepts).
            videos: The videos, in placeholder order.
            padding_side: ``"left"`` (for generation) or ``"right"``.
            return_tensors: ``"pt"`` for tensors, None for Python lists of ids.
            token_reduction: The spec the model will be called with (None: the card's); a pre-LLM
                method changes how many tokens an image expands to (``docs/token-reduction.md``).

        Returns:
            ``input_ids`` and ``attention_mask`` (when ``text`` is given; each placeholder expanded
            to one id per visual token), and the pixel tensors of :meth:`preprocess`.

        Raises:
            InputError (a ValueError): Placeholder counts that do not match the images/videos, bad inputs, or
                text without a tokenizer.
        """
        texts = self._texts(text, images, videos, padding_side, return_tensors)
        out, image_counts, video_counts = self.preprocess(texts, images, videos, token_reduction)
        if texts is not None:
            ids = self._tokenize(texts, image_counts, video_counts)
            out = {**self._pad(ids, padding_side, return_tensors), **out}
        return out

    def preprocess(
        self, texts: list[str] | None, images: Any, videos: Any, token_reduction: object = None
    ) -> tuple[dict[str, Any], list[int], list[int]]:
        """The family's pixel tensors, and how many visual tokens each image / video becomes (under ``token_reduction``)."""
        raise NotImplementedError

    @staticmethod
    def _texts(text: Any, images: Any, videos: Any, padding_side: str, return_tensors: str | None) -> list[str] | None:
        """Validate ``__call__``'s arguments; the prompts as a list (None without text)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else None if text is None else list(text)
        if texts is not None and (not texts or not all(isinstance(t, str) for t in texts)):
            raise InputError("text must be a string or a non-empty list of strings")
        if texts is None and images is None and videos is None:
            raise InputError("nothing to process: pass text, images or videos")
        return texts

    def _tokenize(self, texts: list[str], image_counts: list[int], video_counts: list[int]) -> list[list[int]]:
        """Expand placeholders in text (as HF does, before tokenizing) and encode."""
        if self.tokenizer is None:
            raise ValueError("this processor has no tokenizer; build it with one to process text")
        counts = {self.image_token: iter(image_counts), self.video_token: iter(video_counts)}
        placeholder = re.compile(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})")
        expanded = [placeholder.sub(lambda m: m.group(0) * next(counts[m.group(0)]), t) for t in texts]
        ids = [self._encode_with_routing(t) for t in expanded]
        # The expansion only works if the tokenizer keeps each placeholder as one special token.
        wanted = {self.cfg.tokens.image_token_id: sum(image_counts), self.cfg.tokens.video_token_id: sum(video_counts)}
        for token_id, total in wanted.items():
            found = sum(row.count(token_id) for row in ids)
            if found != total:
                raise ValueError(f"expected {total} tokens of id {token_id} after tokenizing, found {found}")
        return ids

    def _encode_with_routing(self, text: str) -> list[int]:
        """Encode ``text``; with a router, each ``<route>`` marker becomes the routing token id.

        The routing token has no vocabulary entry (the router owns its embedding), so the marker
        is cut out of the text and its id spliced in between the encoded pieces.
        """
        visor = self.cfg.visor
        if visor is None or not visor.router or ROUTE_TOKEN not in text:
            return self.tokenizer.encode(text)
        pieces = text.split(ROUTE_TOKEN)
        ids = self.tokenizer.encode(pieces[0])
        for piece in pieces[1:]:
            ids += [visor.routing_token_id] + (self.tokenizer.encode(piece) if piece else [])
        return ids

    def _pad(self, ids: list[list[int]], padding_side: str, return_tensors: str | None) -> dict[str, Any]:
        pad_id = self.tokenizer.pad_token_id
        pad_id = self.cfg.tokens.pad_token_id if pad_id is None else pad_id
        longest = max(len(row) for row in ids)
        input_ids, mask = [], []
        for row in ids:
            fill = longest - len(row)
            if padding_side == "left":
                input_ids.append([pad_id] * fill + row)
                mask.append([0] * fill + [1] * len(row))
            else:
                input_ids.append(row + [pad_id] * fill)
                mask.append([1] * len(row) + [0] * fill)
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}
        return {"input_ids": input_ids, "attention_mask": mask}

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        images: Any = None,
        videos: Any = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Render one conversation with the chat template, then process it like :meth:`__call__`.

        Args:
            messages: The conversation (see :meth:`apply_chat_template`).
            images: Images in placeholder order; when None, objects embedded in the image parts
                (``{"type": "image", "image": pil_image}``) are used.
            videos: Videos in placeholder order; when None, embedded ``"video"`` objects are used.
            add_generation_prompt: End the prompt with the assistant turn header.
            **kwargs: ``padding_side`` / ``return_tensors`` for :meth:`__call__`.
        """
        prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        if self.cfg.visor is not None and self.cfg.visor.router:
            # The router reads a routing token placed after every question (paper §4.3).
            prompt = _USER_TURN_END.sub(lambda m: m.group(1) + ROUTE_TOKEN + m.group(2), prompt)
        embedded_images, embedded_videos = media_in_messages(messages)
        if images is None and embedded_images and all(x is not None for x in embedded_images):
            images = embedded_images
        if videos is None and embedded_videos and all(x is not None for x in embedded_videos):
            videos = embedded_videos
        if isinstance(images, (list, tuple)) and len(images) == 0:
            images = None
        return self(text=prompt, images=images, videos=videos, **kwargs)

    def profile_ids(self, n_visual: int, n_text: int, seed: int = 0) -> torch.Tensor:
        """``[1, L]``: ``n_text`` random ordinary ids, half before and half after ``n_visual`` image ids.

        For measuring cost without a tokenizer (``visorlib profile``).
        """
        tokens = self.cfg.tokens
        vocab = min(1000, self.cfg.decoder.vocab_size, tokens.image_token_id, tokens.video_token_id)
        g = torch.Generator().manual_seed(seed)
        ids = torch.cat([torch.randint(0, vocab, (n_text // 2,), generator=g),
                         torch.full((n_visual,), tokens.image_token_id),
                         torch.randint(0, vocab, (n_text - n_text // 2,), generator=g)])
        return ids[None]

    def encode_turns(
        self, turns: Sequence[tuple[str, str]], images: Sequence[Any] = (), videos: Sequence[Any] = (),
        token_reduction: object = None,
    ) -> dict[str, Any]:
        """One training sample: a conversation with labels on the assistant's words only.

        Args:
            turns: ``(role, text)`` pairs; ``text`` holds ``<image>`` / ``<video>`` placeholders
                where the media go (LLaVA data style, whatever the family).
            images: The sample's images, in placeholder order.
            videos: The sample's videos, in placeholder order.
            token_reduction: The spec the model will run (None: the card's), for the placeholder counts.

        Returns:
            ``input_ids`` and ``labels`` (1-D, -100 off the assistant answers), plus the family's
            vision tensors for this one sample.

        Turns are written with the family's chat template; an assistant turn is the generation
        prompt followed by the answer and the end-of-turn token, so training sees exactly what
        inference feeds. With a router, a routing marker closes every user turn, as :meth:`chat` does.
        """
        if self.tokenizer is None:
            raise ValueError("this processor has no tokenizer; build it with one to encode training data")
        text = "".join(t for _, t in turns)
        placed = (text.count(IMAGE_TOKEN), text.count(VIDEO_TOKEN))
        if placed != (len(images), len(videos)):
            raise InputError(
                f"{placed[0]} {IMAGE_TOKEN} / {placed[1]} {VIDEO_TOKEN} placeholders but {len(images)} images / "
                f"{len(videos)} videos"
            )
        # One nested group: the images belong to one sample (multi-image rules apply).
        out, image_counts, video_counts = self.preprocess(None, [list(images)] if images else None, list(videos) or None,
                                                          token_reduction)
        counts = {self.image_token: iter(image_counts), self.video_token: iter(video_counts)}
        expand = re.compile(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})")
        routed = self.cfg.visor is not None and self.cfg.visor.router
        if self.default_system and turns and turns[0][0] != "system":
            turns = [("system", self.default_system), *turns]
        ids, labels = [], []
        for role, content in turns:
            if role not in ("user", "assistant", "system"):
                raise ValueError(f"unknown role {role!r} (expected user, assistant or system)")
            content = content.replace(IMAGE_TOKEN, self.data_image).replace(VIDEO_TOKEN, self.data_video)
            content = expand.sub(lambda m: m.group(0) * next(counts[m.group(0)]), content)
            if role == "assistant":
                # Every family's generation prompt is "<|im_start|>assistant\n"; the answer and its
                # end-of-turn token are the targets, whatever follows <|im_end|> (Qwen's "\n") is not.
                head = self._encode_with_routing(f"{IM_START}assistant\n")
                body = self._encode_with_routing(content + IM_END)
                rest = self.turn_close[len(IM_END):]
                tail = self._encode_with_routing(rest) if rest else []
                ids += head + body + tail
                labels += [-100] * len(head) + body + [-100] * len(tail)
            else:
                marker = ROUTE_TOKEN if routed and role == "user" else ""
                piece = self._encode_with_routing(self.turn_open.format(role=role) + content + marker + self.turn_close)
                ids += piece
                labels += [-100] * len(piece)
        out.pop("batch_num_images", None)
        out["input_ids"] = torch.tensor(ids, dtype=torch.long)
        out["labels"] = torch.tensor(labels, dtype=torch.long)
        return out

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of one sequence of ids (see :meth:`Tokenizer.decode`)."""
        if self.tokenizer is None:
            raise ValueError("this processor has no tokenizer to decode with")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True) -> list[str]:
        """Texts of a batch of id sequences (list of lists or 2-D tensor)."""
        if self.tokenizer is None:
            raise ValueError("this processor has no tokenizer to decode with")
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)
