"""Tiny Hugging Face reference models for parity tests (transformers is a test-only oracle)."""

from __future__ import annotations

from pathlib import Path

import torch

TILE, PATCH = 30, 6  # 5x5 = 25 tokens per tile keeps the vision tower tiny
IMAGE_TOKEN, VIDEO_TOKEN, VOCAB = 250, 251, 256


def tiny_hf_config(tied: bool = True, **text_overrides):
    """A LLaVA-OneVision config small enough for CPU tests but exercising every code path."""
    from transformers import LlavaOnevisionConfig

    text = dict(
        model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, rope_theta=10000.0,
        max_position_embeddings=4096,
    )
    text.update(text_overrides)
    return LlavaOnevisionConfig(
        text_config=text,
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, image_size=TILE, patch_size=PATCH, vision_use_head=False,
        ),
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=[[TILE * i, TILE * j] for i in range(1, 7) for j in range(1, 7)],
        tie_word_embeddings=tied,
    )


def tiny_hf_model(tied: bool = True, seed: int = 0):
    """A randomly initialised fp32 transformers LLaVA-OneVision with eager attention."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_hf_config(tied)
    return randomize_norms_and_biases(LlavaOnevisionForConditionalGeneration(cfg))


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


def save_hf(model, folder: Path, layout: str = "v5-save") -> Path:
    """Save ``model`` in one of the on-disk key layouts visorlib must read.

    ``v5-save`` is what transformers 5 writes; ``v4`` nests the SigLIP keys under ``vision_model``
    as the 4.x hub checkpoints do; ``v5-runtime`` uses transformers 5's in-memory names.
    """
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder)
    if layout == "v5-save":
        return folder
    file = folder / "model.safetensors"
    state = load_file(file)
    renamed = {}
    for key, value in state.items():
        if layout == "v4":
            key = key.replace("vision_tower.", "vision_tower.vision_model.", 1)
        elif layout == "v5-runtime":
            if key.startswith("language_model.model."):
                key = "model.language_model." + key[len("language_model.model."):]
            elif key.startswith("language_model.lm_head."):
                key = key[len("language_model."):]
            else:
                key = "model." + key
        renamed[key] = value
    save_file(renamed, file, metadata={"format": "pt"})
    return folder


def left_pad(rows, pad: int = 0):
    """Left-pad 1-D id tensors into ``(input_ids, attention_mask)`` ``[B, L]``."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    return ids, mask
