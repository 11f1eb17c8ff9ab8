"""Tiny Hugging Face reference models for the parity suite (transformers is a test-only oracle).

One :class:`OracleSpec` per model family says how to build the transformers reference of a
visorlib tiny card (its architecture is read off the card, so the reference and the card cannot
drift apart), how to randomise it, which on-disk key layouts visorlib must read, and how to make
inputs. tests/test_parity.py runs every check for every spec in ``SPECS``; visorlib itself loads
the saved reference through its own converters (``visorlib.from_pretrained``). A new family adds
one spec here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import visorlib
from visorlib.processing import anyres

Inputs = dict[str, torch.Tensor]
MakeInputs = Callable[[Any, torch.Generator], Inputs]


@dataclass(frozen=True)
class OracleSpec:
    """How one family's transformers reference is built, saved and fed.

    Attributes:
        family: The card's ``family``.
        card: The visorlib card whose ``tiny()`` sizes the reference.
        hf_class: The transformers model class (by name).
        hf_config: ``tiny card -> transformers config`` of the same architecture.
        randomize: Randomises what initialises to constants (in place; returns the model in eval
            mode with eager attention), so that a swapped or dropped tensor cannot hide.
        cases: Named single-sample inputs ``(card, generator) -> inputs`` for the logits check.
        padded_batch: ``(card, generator) -> (left-padded inputs, [each row alone, unpadded])``.
        generation_batch: ``(card, generator) -> left-padded inputs`` for greedy generation.
        real_hf_config: The released checkpoint's transformers config (written out, not derived
            from the card, so a wrong card fails the parameter count).
        sdpa_case: The case compared once more with visorlib's default SDPA attention.
        layout_case: The case the key-layout checks compare on.
        layouts: Key renames from what ``save_pretrained`` writes (``v5-save``) to other layouts
            visorlib must read (older transformers, in-memory names).
        ties: Word-embedding tying variants to check.
        card_overrides: Applied to ``card.tiny()`` (values the reference has always used).
        hf_extras: Extra arguments transformers needs next to ``inputs``.
        hf_padding_positions: Give transformers' forward padding-aware ``position_ids`` for a
            padded batch (its forward, unlike its generate, would count the padding); False where
            it derives them from the mask itself (Qwen2-VL's M-RoPE).
        real_parameters: The released checkpoint's parameter count, when pinned.
        hf_vision_parameters: The reference's vision-tower parameter count (without a projector).
        save_extras: Writes more files next to the weights (an image processor config).
        max_new_tokens: Greedy generation length.
    """

    family: str
    card: str
    hf_class: str
    hf_config: Callable[[Any], Any]
    randomize: Callable[[torch.nn.Module], torch.nn.Module]
    cases: dict[str, MakeInputs]
    padded_batch: Callable[[Any, torch.Generator], tuple[Inputs, list[Inputs]]]
    generation_batch: MakeInputs
    real_hf_config: Callable[[], Any]
    sdpa_case: str
    layout_case: str
    layouts: dict[str, Callable[[str], str]] = field(default_factory=dict)
    ties: tuple[bool, ...] = (True, False)
    card_overrides: dict[str, Any] = field(default_factory=dict)
    hf_extras: Callable[[Inputs], dict[str, Any]] = lambda inputs: {}
    hf_padding_positions: bool = True
    real_parameters: int | None = None
    hf_vision_parameters: Callable[[torch.nn.Module], int] = lambda hf: parameters(hf.model.vision_tower)
    save_extras: Callable[[Any, Path], Any] | None = None
    max_new_tokens: int = 20

    def tiny_card(self, tied: bool = True):
        """The visorlib tiny card the reference is built from."""
        cfg = visorlib.get_config(self.card).tiny().with_overrides(self.card_overrides)
        return cfg.with_overrides({"decoder": {"tie_word_embeddings": tied}})

    def transformers_class(self):
        import transformers

        return getattr(transformers, self.hf_class)

    def hf_model(self, tied: bool = True, seed: int = 0):
        """A randomly initialised fp32 transformers reference of the tiny card, eager attention."""
        torch.manual_seed(seed)
        return self.randomize(self.transformers_class()(self.hf_config(self.tiny_card(tied))))

    def save(self, model, folder: Path, layout: str = "v5-save") -> Path:
        """Save ``model`` in one of the on-disk key layouts visorlib must read (see ``layouts``)."""
        model.save_pretrained(folder)
        if self.save_extras is not None:
            self.save_extras(self.tiny_card(), folder)
        if layout != "v5-save":
            rename_saved_keys(folder, self.layouts[layout])
        return folder

    def hf_logits(self, hf, inputs: Inputs, padded: bool = False) -> torch.Tensor:
        """The reference's logits for ``inputs`` (padding-aware positions for a padded batch)."""
        extra = dict(self.hf_extras(inputs))
        if padded and self.hf_padding_positions:
            extra["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        torch.manual_seed(1)
        with torch.no_grad():
            return hf(**inputs, **extra).logits


def rename_saved_keys(folder: Path, rename: Callable[[str], str]) -> dict[str, str]:
    """Rewrite ``folder/model.safetensors`` with every key renamed; returns ``{old: new}``."""
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    state = load_file(file)
    names = {key: rename(key) for key in state}
    save_file({names[k]: v for k, v in state.items()}, file, metadata={"format": "pt"})
    return names


def parameters(module: torch.nn.Module) -> int:
    """How many parameters ``module`` holds."""
    return sum(p.numel() for p in module.parameters())


def randomize_norms_and_biases(model, norm_names=("norm",)):
    """``model`` in eval mode with eager attention, its norms and biases randomised.

    Randomised so that a swapped or dropped weight cannot hide behind ones/zeros.
    """
    model = model.eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(n in name for n in norm_names) or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def left_pad(rows, pad: int = 0):
    """Left-pad 1-D id tensors into ``(input_ids, attention_mask)`` ``[B, L]``."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    return ids, mask


def text(n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` random text ids (below the special tokens of the tiny cards)."""
    return torch.randint(0, 240, (n,), generator=g)


def qwen2_text_config(d) -> dict[str, Any]:
    """transformers' Qwen2 ``text_config`` of a visorlib decoder config."""
    return dict(model_type="qwen2", vocab_size=d.vocab_size, hidden_size=d.hidden_size,
                intermediate_size=d.intermediate_size, num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
                num_key_value_heads=d.num_kv_heads, tie_word_embeddings=d.tie_word_embeddings, rope_theta=d.rope_theta,
                rms_norm_eps=d.rms_norm_eps, max_position_embeddings=d.max_position_embeddings)


# The values the tiny references have always used: a faster-turning RoPE than the released 1e6
# makes every position count within the few dozen tokens of a test.
REFERENCE_ROPE = {"decoder": {"rope_theta": 10000.0}}


def run(g: torch.Generator, *segments) -> torch.Tensor:
    """One row of ids: ints are that many random text ids, ``(token, n)`` a run of ``n`` placeholders."""
    return torch.cat([torch.full((s[1],), s[0]) if isinstance(s, tuple) else text(s, g) for s in segments])


# -- LLaVA-OneVision: SigLIP tiles (anyres), 2-layer projector, Qwen2 ------------------------------------------

TILE, PATCH = 30, 6  # the tiny card's tile: 5x5 = 25 tokens per tile keeps the vision tower tiny
IMAGE_TOKEN, VIDEO_TOKEN, VOCAB = 250, 251, 256  # every tiny card's placeholder ids and vocabulary


def llava_hf_config(cfg):
    """transformers' ``LlavaOnevisionConfig`` of a visorlib LLaVA-OneVision card."""
    from transformers import LlavaOnevisionConfig

    v, d = cfg.vision, cfg.decoder
    return LlavaOnevisionConfig(
        text_config=qwen2_text_config(d),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=v.hidden_size,
                           intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                           num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                           layer_norm_eps=v.layer_norm_eps, vision_use_head=False),
        image_token_index=cfg.tokens.image_token_id,
        video_token_index=cfg.tokens.video_token_id,
        image_grid_pinpoints=cfg.processing.pinpoints(v.image_size),
        tie_word_embeddings=d.tie_word_embeddings,
    )


def llava_image_tokens(cfg, size, tiled: bool = True) -> int:
    p, v = cfg.processing, cfg.vision
    return anyres.num_image_tokens(size, p.pinpoints(v.image_size), v.image_size, v.image_size // v.patch_size,
                                   p.max_tiles, tiled=tiled)


def llava_tiles(cfg, size) -> int:
    return anyres.num_tiles(size, cfg.processing.pinpoints(cfg.vision.image_size), cfg.vision.image_size)


def llava_image(size):
    """A one-image case: text, the image's placeholders (all its tiles), text."""

    def make(cfg, g):
        ids = run(g, 4, (cfg.tokens.image_token_id, llava_image_tokens(cfg, size)), 7)[None]
        side = cfg.vision.image_size
        return dict(input_ids=ids, pixel_values=torch.randn(1, llava_tiles(cfg, size), 3, side, side, generator=g),
                    image_sizes=torch.tensor([size]))

    return make


def llava_three_images(cfg, g):
    sizes, image = [(60, 90), (200, 40), (30, 30)], cfg.tokens.image_token_id
    ids = run(g, 2, (image, llava_image_tokens(cfg, sizes[0], tiled=False)), 3,
              (image, llava_image_tokens(cfg, sizes[1], tiled=False)), 1,
              (image, llava_image_tokens(cfg, sizes[2], tiled=False)), 5)[None]
    side = cfg.vision.image_size
    # pixel_values is padded to the largest tile count, as the processors produce it.
    return dict(input_ids=ids, pixel_values=torch.randn(3, 13, 3, side, side, generator=g),
                image_sizes=torch.tensor(sizes), batch_num_images=torch.tensor([3]))


def llava_video(cfg, g):
    frames, side = 4, cfg.vision.image_size
    ids = run(g, 3, (cfg.tokens.video_token_id, anyres.num_video_tokens(frames, side // cfg.vision.patch_size)), 6)
    return dict(input_ids=ids[None], pixel_values_videos=torch.randn(1, frames, 3, side, side, generator=g))


def llava_rows(cfg, g, texts, sizes, tiles=None):
    """Left-padded one-image rows ``text, image, text``, and each row alone (its own tiles only)."""
    image, side = cfg.tokens.image_token_id, cfg.vision.image_size
    rows = [run(g, a, (image, llava_image_tokens(cfg, s)), b) for (a, b), s in zip(texts, sizes, strict=True)]
    ids, mask = left_pad(rows)
    tiles = tiles or max(llava_tiles(cfg, s) for s in sizes)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(len(rows), tiles, 3, side, side, generator=g),
                  image_sizes=torch.tensor(sizes))
    alone = [dict(input_ids=r[None], pixel_values=inputs["pixel_values"][i: i + 1, : llava_tiles(cfg, sizes[i])],
                  image_sizes=inputs["image_sizes"][i: i + 1]) for i, r in enumerate(rows)]
    return inputs, alone


def llava_v5_runtime(key: str) -> str:
    """transformers 5's in-memory names (``model.language_model.*``, ``model.vision_tower.*``)."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model."):]
    if key.startswith("language_model.lm_head."):
        return key[len("language_model."):]
    return "model." + key


def llava_real_config():
    """llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP-so400m (26 layers used) + Qwen2-0.5B."""
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=152000, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_theta=1e6),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                           vision_use_head=False),
        tie_word_embeddings=True,
    )


LLAVA_SIZES = {"wide-unpad": (60, 90), "tall-unpad": (90, 60), "very-wide": (45, 200), "very-tall": (200, 40),
               "one-tile": (30, 30), "downscale": (300, 310), "downscale-large": (1000, 997)}

LLAVA_ONEVISION = OracleSpec(
    family="llava_onevision",
    card="llava-ov-0.5b",
    hf_class="LlavaOnevisionForConditionalGeneration",
    hf_config=llava_hf_config,
    randomize=randomize_norms_and_biases,
    cases={**{f"image-{name}": llava_image(size) for name, size in LLAVA_SIZES.items()},
           "three-images": llava_three_images, "video": llava_video, "text": lambda cfg, g: dict(input_ids=text(19, g)[None])},
    padded_batch=lambda cfg, g: llava_rows(cfg, g, [(3, 9), (1, 2)], [(60, 90), (45, 200)]),
    generation_batch=lambda cfg, g: llava_rows(cfg, g, [(3, 4), (2, 1)], [(60, 90), (45, 200)], tiles=13)[0],
    real_hf_config=llava_real_config,
    sdpa_case="image-wide-unpad",
    layout_case="image-wide-unpad",
    # v4: the 4.x hub checkpoints nest the SigLIP keys under vision_model.
    layouts={"v4": lambda key: key.replace("vision_tower.", "vision_tower.vision_model.", 1),
             "v5-runtime": llava_v5_runtime},
    card_overrides=REFERENCE_ROPE,
)


def tiny_hf_config(tied: bool = True, **text_overrides):
    """The tiny LLaVA-OneVision reference's transformers config (``text_overrides`` on its text config)."""
    cfg = llava_hf_config(LLAVA_ONEVISION.tiny_card(tied))
    for key, value in text_overrides.items():
        setattr(cfg.text_config, key, value)
    return cfg


def tiny_hf_model(tied: bool = True, seed: int = 0):
    """A randomly initialised fp32 transformers LLaVA-OneVision with eager attention."""
    return LLAVA_ONEVISION.hf_model(tied, seed)


def save_hf(model, folder: Path, layout: str = "v5-save") -> Path:
    """Save a LLaVA-OneVision reference in a key layout: ``v5-save``, ``v4`` or ``v5-runtime``."""
    return LLAVA_ONEVISION.save(model, folder, layout)


# -- Qwen2-VL: native-resolution ViT, 2x2 patch merger, Qwen2 with M-RoPE --------------------------------------

VISION_START, VISION_END = 248, 249


def qwen2_vl_hf_config(cfg):
    """transformers' ``Qwen2VLConfig`` of a visorlib Qwen2-VL card."""
    from transformers import Qwen2VLConfig

    v, d = cfg.vision, cfg.decoder
    if v.intermediate_size % v.hidden_size:
        raise ValueError(f"transformers' Qwen2-VL tower MLP is an integer mlp_ratio wide, not {v.intermediate_size}")
    text_cfg = {k: x for k, x in qwen2_text_config(d).items() if k not in ("model_type", "rope_theta")}
    text_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": d.rope_theta, "mrope_section": d.mrope_section}
    return Qwen2VLConfig(
        text_config=text_cfg,
        vision_config=dict(depth=v.num_layers, embed_dim=v.hidden_size, hidden_size=d.hidden_size, num_heads=v.num_heads,
                           mlp_ratio=v.intermediate_size // v.hidden_size, patch_size=v.patch_size,
                           spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                           in_channels=v.in_channels),
        image_token_id=cfg.tokens.image_token_id, video_token_id=cfg.tokens.video_token_id,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=d.tie_word_embeddings,
    )


def qwen2_vl_visual(cfg, grid, video: bool = False) -> torch.Tensor:
    """The placeholder run of one image/video of patch grid ``(t, h, w)``, wrapped as the template does."""
    token = cfg.tokens.video_token_id if video else cfg.tokens.image_token_id
    count = int(torch.tensor(grid).prod()) // cfg.vision.spatial_merge_size**2
    return torch.cat([torch.tensor([VISION_START]), torch.full((count,), token), torch.tensor([VISION_END])])


def qwen2_vl_pixels(cfg, g, images=(), videos=()) -> Inputs:
    """Flattened random patches plus ``*_grid_thw`` for the given patch grids."""
    v = cfg.vision
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    out = {}
    for kind, grids in (("image", images), ("video", videos)):
        if grids:
            grid = torch.tensor(grids)
            key = "pixel_values" if kind == "image" else "pixel_values_videos"
            out[key] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
            out[f"{kind}_grid_thw"] = grid
    return out


def qwen2_vl_images(*grids, texts=(2, 3, 4)):
    """A case of ``len(grids)`` images between text runs."""

    def make(cfg, g):
        segments = [texts[0]]
        for grid, after in zip(grids, texts[1:], strict=True):
            segments += [qwen2_vl_visual(cfg, grid), after]
        ids = torch.cat([s if isinstance(s, torch.Tensor) else text(s, g) for s in segments])[None]
        return dict(input_ids=ids, **qwen2_vl_pixels(cfg, g, images=list(grids)))

    return make


def qwen2_vl_video_and_image(cfg, g):
    # Videos whose temporal patches outnumber neither merged side: see the docs on M-RoPE.
    video, image = (2, 4, 4), (1, 4, 2)
    ids = torch.cat([text(3, g), qwen2_vl_visual(cfg, video, video=True), text(2, g), qwen2_vl_visual(cfg, image),
                     text(5, g)])[None]
    return dict(input_ids=ids, **qwen2_vl_pixels(cfg, g, images=[image], videos=[video]))


def qwen2_vl_rows(cfg, g, texts, grids):
    """Left-padded one-image rows, and each row alone with its own patches."""
    rows = [torch.cat([text(a, g), qwen2_vl_visual(cfg, grid), text(b, g)]) for (a, b), grid in zip(texts, grids, strict=True)]
    ids, mask = left_pad(rows)
    inputs = dict(input_ids=ids, attention_mask=mask, **qwen2_vl_pixels(cfg, g, images=grids))
    patches = [int(torch.tensor(grid).prod()) for grid in grids]
    alone = [dict(input_ids=r[None], pixel_values=inputs["pixel_values"][sum(patches[:i]): sum(patches[: i + 1])],
                  image_grid_thw=inputs["image_grid_thw"][i: i + 1]) for i, r in enumerate(rows)]
    return inputs, alone


def qwen2_vl_v5_runtime(key: str) -> str:
    """transformers 5's in-memory names (``model.language_model.*``, ``model.visual.*``)."""
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return "model." + key if key.startswith("visual.") else key


def qwen2_vl_real_config():
    """Qwen/Qwen2-VL-2B-Instruct's architecture."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14),
        tie_word_embeddings=True,
    )


def qwen2_vl_token_types(inputs: Inputs) -> dict[str, torch.Tensor]:
    """transformers needs ``mm_token_type_ids`` (1 image, 2 video) next to ``*_grid_thw``."""
    ids = inputs["input_ids"]
    return {"mm_token_type_ids": (ids == IMAGE_TOKEN).long() + 2 * (ids == VIDEO_TOKEN).long()}


QWEN2_VL = OracleSpec(
    family="qwen2_vl",
    card="qwen2-vl-2b",
    hf_class="Qwen2VLForConditionalGeneration",
    hf_config=qwen2_vl_hf_config,
    randomize=lambda model: randomize_norms_and_biases(model, ("norm", "ln_q")),
    cases={**{f"image-{h}x{w}": qwen2_vl_images((1, h, w), texts=(3, 6)) for h, w in [(4, 6), (2, 2), (10, 4), (2, 16)]},
           "two-images": qwen2_vl_images((1, 4, 6), (1, 6, 2)), "video-and-image": qwen2_vl_video_and_image,
           "text": lambda cfg, g: dict(input_ids=text(17, g)[None])},
    padded_batch=lambda cfg, g: qwen2_vl_rows(cfg, g, [(3, 9), (1, 2)], [(1, 4, 6), (1, 2, 4)]),
    generation_batch=lambda cfg, g: qwen2_vl_rows(cfg, g, [(3, 4), (2, 1)], [(1, 4, 6), (1, 6, 2)])[0],
    real_hf_config=qwen2_vl_real_config,
    sdpa_case="two-images",
    layout_case="image-4x6",
    layouts={"v5-runtime": qwen2_vl_v5_runtime},
    # The reference's tower MLP has always been 4x wide (transformers' default mlp_ratio).
    card_overrides={**REFERENCE_ROPE, "vision": {"intermediate_size": 128}},
    hf_extras=qwen2_vl_token_types,
    hf_padding_positions=False,  # transformers derives M-RoPE positions from the mask itself
    real_parameters=2_208_985_600,
    hf_vision_parameters=lambda hf: parameters(hf.model.visual) - parameters(hf.model.visual.merger),
)


# -- Qwen2.5-VL: windowed ViT (RMSNorm, gated MLP), 2x2 merger, Qwen2 with time-aligned M-RoPE ------------------


def qwen2_5_vl_hf_config(cfg):
    """transformers' ``Qwen2_5_VLConfig`` of a visorlib Qwen2.5-VL card."""
    from transformers import Qwen2_5_VLConfig

    v, d = cfg.vision, cfg.decoder
    text_cfg = {k: x for k, x in qwen2_text_config(d).items() if k not in ("model_type", "rope_theta")}
    text_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": d.rope_theta, "mrope_section": d.mrope_section}
    return Qwen2_5_VLConfig(
        text_config=text_cfg,
        vision_config=dict(depth=v.num_layers, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_heads=v.num_heads, out_hidden_size=d.hidden_size, patch_size=v.patch_size,
                           spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                           in_channels=v.in_channels, hidden_act=v.hidden_act, window_size=v.window_size,
                           fullatt_block_indexes=list(v.fullatt_block_indexes),
                           tokens_per_second=int(v.tokens_per_second)),
        image_token_id=cfg.tokens.image_token_id, video_token_id=cfg.tokens.video_token_id,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=d.tie_word_embeddings,
    )


def qwen2_5_vl_video(seconds: float, with_image: bool = False):
    """A video of 3 temporal patches (4x4 tokens, 4 windows a frame), ``seconds`` per temporal patch.

    At the tiny card's 2 tokens per second, 0.75 s gives temporal positions 0, 1, 3 (the float
    step truncated, as the reference does), which stay below the 4 merged rows: there visorlib's
    rule for the text after a video and transformers 5.23's agree (see the model's docstring).
    """

    def make(cfg, g):
        video, image = (3, 8, 8), (1, 4, 6)
        parts = [text(3, g), qwen2_vl_visual(cfg, video, video=True), text(2, g)]
        if with_image:
            parts += [qwen2_vl_visual(cfg, image), text(4, g)]
        pixels = qwen2_vl_pixels(cfg, g, images=[image] if with_image else [], videos=[video])
        return dict(input_ids=torch.cat(parts)[None], **pixels, second_per_grid_ts=torch.tensor([seconds]))

    return make


def qwen2_5_vl_real_config():
    """Qwen/Qwen2.5-VL-3B-Instruct's architecture."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        tie_word_embeddings=True,
    )


QWEN2_5_VL = OracleSpec(
    family="qwen2_5_vl",
    card="qwen2.5-vl-3b",
    hf_class="Qwen2_5_VLForConditionalGeneration",
    hf_config=qwen2_5_vl_hf_config,
    randomize=lambda model: randomize_norms_and_biases(model, ("norm", "ln_q")),
    # Windows are 2x2 tokens (4x4 patches) at the tiny size: 8x12 patches are 6 windows, 10x6 has
    # partial windows at its edge, 2x2 is one window smaller than a window; block 1 attends fully.
    cases={**{f"image-{h}x{w}": qwen2_vl_images((1, h, w), texts=(3, 6)) for h, w in [(8, 12), (10, 6), (2, 2)]},
           "two-images": qwen2_vl_images((1, 8, 12), (1, 6, 4)), "video": qwen2_5_vl_video(0.75),
           "video-one-second": qwen2_5_vl_video(0.5), "video-and-image": qwen2_5_vl_video(0.75, with_image=True),
           "text": lambda cfg, g: dict(input_ids=text(17, g)[None])},
    padded_batch=lambda cfg, g: qwen2_vl_rows(cfg, g, [(3, 9), (1, 2)], [(1, 8, 12), (1, 2, 4)]),
    generation_batch=lambda cfg, g: qwen2_vl_rows(cfg, g, [(3, 4), (2, 1)], [(1, 8, 12), (1, 6, 2)])[0],
    real_hf_config=qwen2_5_vl_real_config,
    sdpa_case="two-images",
    layout_case="image-8x12",
    layouts={"v5-runtime": qwen2_vl_v5_runtime},
    card_overrides=REFERENCE_ROPE,
    hf_extras=qwen2_vl_token_types,
    hf_padding_positions=False,  # transformers derives M-RoPE positions from the mask itself
    real_parameters=3_754_622_976,
    hf_vision_parameters=lambda hf: parameters(hf.model.visual) - parameters(hf.model.visual.merger),
)


# -- InternVL3: InternViT tiles, pixel shuffle, LayerNorm + MLP projector, Qwen2 ---------------------------------


def internvl_hf_config(cfg):
    """transformers' ``InternVLConfig`` of a visorlib InternVL card (the card's sizes are the shuffled ones)."""
    from transformers import InternVLConfig

    v, d = cfg.vision, cfg.decoder
    fold = round(1 / v.downsample_ratio)
    return InternVLConfig(
        text_config=qwen2_text_config(d),
        vision_config=dict(hidden_size=v.hidden_size // fold**2, num_hidden_layers=v.num_layers,
                           num_attention_heads=v.num_heads, intermediate_size=v.intermediate_size,
                           image_size=v.image_size, patch_size=v.patch_size // fold, attention_bias=True,
                           layer_norm_eps=v.layer_norm_eps, use_qk_norm=v.use_qk_norm,
                           layer_scale_init_value=v.layer_scale_init),
        downsample_ratio=v.downsample_ratio, image_token_id=cfg.tokens.image_token_id,
        tie_word_embeddings=d.tie_word_embeddings,
    )


IMG_START, IMG_END = 248, 249  # <img> and </img> of the tiny InternVL inputs


def internvl_image(cfg, tiles: int) -> torch.Tensor:
    """One image's ids as the processor writes them: ``<img>``, 16 tokens a tile (tiny card), ``</img>``."""
    return torch.cat([torch.tensor([IMG_START]), torch.full((tiles * cfg.vision.tokens_per_tile,),
                                                             cfg.tokens.image_token_id), torch.tensor([IMG_END])])


def internvl_images(*tiles, texts=(3, 4, 2)):
    """A case of ``len(tiles)`` images (that many tiles each, thumbnail included) between text runs."""

    def make(cfg, g):
        parts = [text(texts[0], g)]
        for n, after in zip(tiles, texts[1:], strict=True):
            parts += [internvl_image(cfg, n), text(after, g)]
        side = cfg.vision.image_size
        return dict(input_ids=torch.cat(parts)[None], pixel_values=torch.randn(sum(tiles), 3, side, side, generator=g))

    return make


def internvl_rows(cfg, g, texts, tiles):
    """Left-padded one-image rows, and each row alone with its own tiles."""
    rows = [torch.cat([text(a, g), internvl_image(cfg, n), text(b, g)]) for (a, b), n in zip(texts, tiles, strict=True)]
    ids, mask = left_pad(rows)
    side = cfg.vision.image_size
    pixels = torch.randn(sum(tiles), 3, side, side, generator=g)
    alone = [dict(input_ids=r[None], pixel_values=pixels[sum(tiles[:i]): sum(tiles[: i + 1])]) for i, r in enumerate(rows)]
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels), alone


def internvl_v5_runtime(key: str) -> str:
    """transformers 5's in-memory names (``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``)."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model."):]
    if key.startswith("language_model.lm_head."):
        return key[len("language_model."):]
    return "model." + key


def internvl_real_config():
    """OpenGVLab/InternVL3-1B-hf's architecture: InternViT-300M + Qwen2.5-0.5B, untied head."""
    from transformers import InternVLConfig

    return InternVLConfig(
        text_config=dict(model_type="qwen2", vocab_size=151674, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=False,
                         rope_theta=1e6),
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           image_size=448, patch_size=14, attention_bias=True, layer_scale_init_value=0.1),
        downsample_ratio=0.5, image_token_id=151667, tie_word_embeddings=False,
    )


INTERNVL = OracleSpec(
    family="internvl",
    card="internvl3-1b",
    hf_class="InternVLForConditionalGeneration",
    hf_config=internvl_hf_config,
    # Norms, biases, layer scales, and the class token and positions (transformers starts them at 0).
    randomize=lambda model: randomize_norms_and_biases(model, ("norm", "lambda", "cls_token", "position_embeddings")),
    cases={"text": lambda cfg, g: dict(input_ids=text(19, g)[None]), "image-one-tile": internvl_images(1, texts=(3, 5)),
           "image-six-tiles": internvl_images(6, texts=(2, 7)), "two-images": internvl_images(3, 1),
           "frames-as-images": internvl_images(1, 1, 1, texts=(2, 1, 1, 3))},
    padded_batch=lambda cfg, g: internvl_rows(cfg, g, [(3, 9), (1, 2)], [3, 1]),
    generation_batch=lambda cfg, g: internvl_rows(cfg, g, [(3, 4), (2, 1)], [3, 1])[0],
    real_hf_config=internvl_real_config,
    sdpa_case="two-images",
    layout_case="image-six-tiles",
    layouts={"v5-runtime": internvl_v5_runtime},
    card_overrides=REFERENCE_ROPE,
    real_parameters=938_193_024,
)


# -- FastVLM: a FastViT (timm) tower, one padded square tile, Qwen2 --------------------------------------------


def fast_vlm_hf_config(cfg):
    """transformers' ``FastVlmConfig`` of a visorlib FastVLM card (the tower is timm's, by name)."""
    from transformers import FastVlmConfig

    v, d = cfg.vision, cfg.decoder
    vision = dict(model_type="timm_wrapper", architecture=v.timm_model, hidden_size=v.hidden_size,
                  model_args=dict(inference_mode=True, **v.timm_kwargs))
    return FastVlmConfig(text_config=qwen2_text_config(d), vision_config=vision, image_token_id=cfg.tokens.image_token_id,
                         tie_word_embeddings=d.tie_word_embeddings)


def randomize_fast_vlm(model):
    """Randomise what initialises to constants (norms, biases, layer scales, BatchNorm statistics).

    Large layer scales make every block count; transformers' std-0.02 convolutions would let the
    pixels fade out within the stem, hence He init.
    """
    model = model.eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for module in model.model.vision_tower.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.normal_(std=0.5)
            elif "norm" in name or "bn" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(std=0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    return model


def fast_vlm_image_processor(cfg, folder: Path | None = None):
    """FastVLM's image processor (CLIP: crop = tile, the card's mean/std), saved to ``folder`` if given."""
    from transformers import CLIPImageProcessor

    side, p = cfg.vision.image_size, cfg.processing
    processor = CLIPImageProcessor(crop_size={"height": side, "width": side}, size={"shortest_edge": side},
                                   image_mean=list(p.image_mean), image_std=list(p.image_std))
    if folder is not None:
        processor.save_pretrained(folder)
    return processor


def fast_vlm_tokens(cfg) -> int:
    return (cfg.vision.image_size // cfg.vision.patch_size) ** 2  # FastViT downsamples 64x


def fast_vlm_rows(cfg, g, texts):
    """Left-padded one-image rows (one square tile an image), and each row alone."""
    image, side = cfg.tokens.image_token_id, cfg.vision.image_size
    rows = [run(g, a, (image, fast_vlm_tokens(cfg)), b) for a, b in texts]
    ids, mask = left_pad(rows)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(len(rows), 3, side, side, generator=g))
    return inputs, [dict(input_ids=r[None], pixel_values=inputs["pixel_values"][i: i + 1]) for i, r in enumerate(rows)]


def fast_vlm_image(cfg, g):
    side = cfg.vision.image_size
    return dict(input_ids=run(g, 4, (cfg.tokens.image_token_id, fast_vlm_tokens(cfg)), 7)[None],
                pixel_values=torch.randn(1, 3, side, side, generator=g))


def fast_vlm_real_config():
    """KamilaMila/FastVLM-0.5B: Qwen2-0.5B plus an <image> token (vocabulary padded to 152000), FastViTHD."""
    from transformers import FastVlmConfig

    text_cfg = dict(model_type="qwen2", vocab_size=152000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)
    vision = dict(model_type="timm_wrapper", architecture="fastvit_mci3", hidden_size=3072,
                  model_args=dict(inference_mode=True))
    return FastVlmConfig(text_config=text_cfg, vision_config=vision, tie_word_embeddings=True)


FAST_VLM = OracleSpec(
    family="fast_vlm",
    card="fastvlm-0.5b",
    hf_class="FastVlmForConditionalGeneration",
    hf_config=fast_vlm_hf_config,
    randomize=randomize_fast_vlm,
    cases={"text": lambda cfg, g: dict(input_ids=text(19, g)[None]), "image": fast_vlm_image},
    padded_batch=lambda cfg, g: fast_vlm_rows(cfg, g, [(3, 9), (1, 2)]),
    generation_batch=lambda cfg, g: fast_vlm_rows(cfg, g, [(3, 9), (1, 2)])[0],
    real_hf_config=fast_vlm_real_config,
    sdpa_case="image",
    layout_case="image",
    card_overrides=REFERENCE_ROPE,
    save_extras=fast_vlm_image_processor,
)

SPECS = [LLAVA_ONEVISION, QWEN2_VL, FAST_VLM, QWEN2_5_VL, INTERNVL]
