"""A tiny random VISOR checkpoint with the synthetic task's tokenizer, shared by the eval tests."""

from __future__ import annotations

import shutil
import warnings

import torch

import visorlib
from visorlib.train import make_synthetic_dataset


def tiny_checkpoint(folder, samples: int = 4):
    """``(checkpoint dir, data.jsonl)``: random tiny visor-llava-ov-0.5b + a synthetic dataset."""
    cfg = visorlib.get_config("visor-llava-ov-0.5b").tiny()
    data = make_synthetic_dataset(folder / "synth", cfg, samples=samples, image_size=60)
    torch.manual_seed(0)
    model = visorlib.zoo.instantiate(cfg).eval()
    with torch.no_grad():  # a random, not zero-initialised, router so that routing varies by sample
        for param in model.router.parameters():
            param.normal_(std=0.5)
    ckpt = folder / "ckpt"
    model.save_pretrained(ckpt)
    shutil.copy(folder / "synth" / "tokenizer.json", ckpt / "tokenizer.json")
    return ckpt, data


def load(ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = visorlib.from_pretrained(ckpt)
    return model, visorlib.processor_for(model)
