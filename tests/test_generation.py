"""Generation: the KV cache changes nothing but speed; sampling and stopping behave."""

from __future__ import annotations

import torch

import visorlib
from visorlib.generation import filter_logits
from visorlib.processing import anyres


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return visorlib.zoo.instantiate(visorlib.get_config("llava-ov-0.5b").tiny()).eval()


def image_batch(model):
    cfg = model.cfg
    size = (60, 90)
    pins = cfg.processing.pinpoints(30)
    n = anyres.num_image_tokens(size, pins, 30, cfg.vision.grid_size, cfg.processing.max_tiles)
    row = torch.cat([torch.randint(0, 240, (3,)), torch.full((n,), cfg.tokens.image_token_id), torch.randint(0, 240, (4,))])
    ids = torch.stack([row, torch.cat([torch.zeros(2, dtype=torch.long), row[:-2]])])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    tiles = anyres.num_tiles(size, pins, 30)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, tiles, 3, 30, 30),
                image_sizes=torch.tensor([size, size]))


def test_cached_generation_equals_full_recompute():
    model = tiny_model()
    inputs = image_batch(model)
    steps = 12
    got = model.generate(**inputs, max_new_tokens=steps, eos_token_id=[])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    vision = {k: inputs[k] for k in ("pixel_values", "image_sizes")}
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids, mask, **vision).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(got, ids)


def test_eos_stops_and_pads():
    model = tiny_model(1)
    inputs = image_batch(model)
    first = model.generate(**inputs, max_new_tokens=1, eos_token_id=[])[:, -1]
    out = model.generate(**inputs, max_new_tokens=8, eos_token_id=int(first[0]), pad_token_id=7)
    new = out[:, inputs["input_ids"].shape[1]:]
    assert new[0, 0] == first[0] and (new[0, 1:] == 7).all()
    if first[1] != first[0]:
        assert new.shape[1] > 1  # the other row kept going


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny_model(2)
    inputs = image_batch(model)
    greedy = model.generate(**inputs, max_new_tokens=6, eos_token_id=[])
    a = model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=[],
                       generator=torch.Generator().manual_seed(0))
    b = model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, eos_token_id=[],
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    k1 = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=1, eos_token_id=[],
                        generator=torch.Generator().manual_seed(3))
    assert torch.equal(k1, greedy)


def test_filter_logits_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, 1.0, 2, 1.0)).sum() == 2
