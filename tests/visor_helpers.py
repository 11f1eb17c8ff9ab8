"""Tiny VISOR models and inputs shared by the VISOR tests."""

from __future__ import annotations

import torch
from cases_qwen2_vl import Qwen2VLCase
from hf_oracle import left_pad

import visorlib
from visorlib.models.llava_onevision import LlavaOnevisionProcessor

ROUTING = 252


def tiny_cfg(num_layers: int = 6, card: str = "llava-ov-0.5b", **visor):
    """A 6-layer tiny ``card``: CA at 0 and 3, SA candidates 1, 2, 4, a router before layer 2."""
    spec = dict(ca_layers=[0, 3], sa_layers=[1, 2, 4], configurations=[[1], [1, 2], [1, 4], [1, 2, 4]],
                router=True, router_hidden=16, routing_token_id=ROUTING)
    spec.update(visor)
    cfg = visorlib.get_config(card).tiny().with_overrides({"decoder": {"num_layers": num_layers}})
    return cfg.with_overrides({"visor": spec}) if spec.get("sa_layers") is not None else cfg


def build(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = visorlib.zoo.instantiate(cfg).eval()
    # Random (not zero) conv and gate values, so tests see the blocks actually doing something.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "pos_embed.conv" in name or name.endswith("gate") or "router" in name:
                param.normal_(std=0.3)
    return model


def sample(model, size=(60, 90), text_before=3, text_after=5, routing=True, seed=0):
    """One row: text, an image, a question, optionally a routing token."""
    g = torch.Generator().manual_seed(seed)
    n = LlavaOnevisionProcessor(model.cfg).num_image_tokens(size)
    parts = [torch.randint(0, 200, (text_before,), generator=g), torch.full((n,), model.cfg.tokens.image_token_id),
             torch.randint(0, 200, (text_after,), generator=g)]
    if routing:
        parts.append(torch.tensor([ROUTING]))
    return torch.cat(parts), size


def batch(model, rows, seed=0):
    """Left-pad rows ``[(ids, size), ...]`` into model inputs."""
    from visorlib.processing import anyres

    ids, mask = left_pad([row for row, _ in rows])
    pins = model.cfg.processing.pinpoints(model.cfg.vision.image_size)
    tiles = max(anyres.num_tiles(size, pins, model.cfg.vision.image_size) for _, size in rows)
    g = torch.Generator().manual_seed(seed)
    side = model.cfg.vision.image_size
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(len(rows), tiles, 3, side, side, generator=g),
                image_sizes=torch.tensor([size for _, size in rows]))


def row_inputs(inputs, i, model):
    """Sample ``i`` of a batch, alone and unpadded."""
    from visorlib.processing import anyres

    keep = inputs["attention_mask"][i].bool()
    size = inputs["image_sizes"][i].tolist()
    tiles = anyres.num_tiles(size, model.cfg.processing.pinpoints(model.cfg.vision.image_size), model.cfg.vision.image_size)
    return dict(input_ids=inputs["input_ids"][i, keep][None], pixel_values=inputs["pixel_values"][i: i + 1, :tiles],
                image_sizes=inputs["image_sizes"][i: i + 1])


def word_tokenizer(folder, cfg):
    """A word-level tokenizer whose special ids agree with the tiny card."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<image>": cfg.tokens.image_token_id,
                "<video>": cfg.tokens.video_token_id}
    words = ["user", "assistant", "what", "is", "this", "?", "\n", "[UNK]"] + [f"w{i}" for i in range(200)]
    vocab = dict(specials)
    for word in words:
        vocab.setdefault(word, len(vocab) + 2)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()])
    tok.add_special_tokens(list(specials))
    tok.save(str(folder / "tokenizer.json"))


class LlavaCase:
    """How the backbone-agnostic VISOR tests drive one model family (here LLaVA-OneVision).

    A case builds a tiny 6-layer VISOR model (CA at 0 and 3; SA candidates 1, 2, 4; router after
    layer 1), makes per-sample inputs in three shapes (``variant`` 0-2), batches them with left
    padding, and cuts one sample back out. New backbones add a case with the same methods to
    ``CASES`` and every invariant test in tests/test_visor.py runs for them too.
    """

    name = "llava_onevision"
    sizes = [(60, 90), (45, 200), (30, 30)]
    text = [(3, 5), (1, 2), (6, 4)]

    def tiny_cfg(self, **visor):
        return tiny_cfg(**visor)

    def sample(self, model, variant=0, routing=True, seed=0):
        before, after = self.text[variant]
        return sample(model, self.sizes[variant], before, after, routing=routing, seed=seed)

    def batch(self, model, rows, seed=0):
        return batch(model, rows, seed)

    def row_inputs(self, inputs, i, model):
        return row_inputs(inputs, i, model)

    def other_pixels(self, inputs):
        """The same inputs with different pixels (same shapes and token counts)."""
        return dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]))

    def visual_mask(self, model, inputs):
        return inputs["input_ids"] == model.cfg.tokens.image_token_id

    def embed(self, model, inputs):
        """``(embeds, visual_mask, segments, position_ids)`` of a single unpadded sample."""
        ids = inputs["input_ids"]
        embeds, visual, segments = model.embed(ids, inputs["pixel_values"], inputs.get("image_sizes"))
        return embeds, visual, segments, torch.arange(ids.shape[1])[None]


from cases_fastvlm import FastVLMCase  # noqa: E402 - it subclasses LlavaCase, defined above

CASES = [LlavaCase(), Qwen2VLCase(), FastVLMCase()]
