"""Pre-LLM token reduction (VisionZip, VisPruner, HiRED, pooling) inside LLaVA-OneVision and FastVLM.

What is checked: keeping every token (keep 1.0, or a tile's full count) is no reduction and
reproduces the unreduced logits exactly, for single-tile and anyres images alike; a reduced
anyres image has the documented layout (tiles' tokens in tile order, base first, one newline); the rows the
model writes equal the phase-1 functions' choice on the model's own tower; a padded batch whose
samples keep different counts (HiRED) equals each sample alone; the processor's counts (per call
and from the card) drive generate; VISOR and VISOR-TR packing compose with a reducer; bad inputs
are refused with clear errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from visor_helpers import batch, build, row_inputs, sample, tiny_cfg, word_tokenizer

import visorlib
from visorlib.flops import prefill_flops
from visorlib.models.llava_onevision import LlavaOnevisionProcessor
from visorlib.processing import anyres
from visorlib.visor.reduction import (
    ReductionSpecError,
    TowerAttentionCapture,
    hired,
    pooling,
    tower_layers,
    visionzip,
    vispruner,
)

# The tiny card's tiles are 5x5 = 25 tokens; a (60, 90) image is 1 base + 2x3 tiles.
SPECS = {
    "visionzip": {"method": "visionzip", "keep": 10},
    "vispruner": {"method": "vispruner", "keep": 12, "step": 2},
    "hired": {"method": "hired", "keep": 0.3},
    "pooling": {"method": "pooling", "keep": 0.25},
}
KEEP_ALL = {"visionzip": {"method": "visionzip", "keep": 1.0}, "vispruner": {"method": "vispruner", "keep": 1.0},
            "hired": {"method": "hired", "keep": 1.0}, "pooling": {"method": "pooling", "keep": 1.0}}


def dense_model():
    return build(tiny_cfg(sa_layers=None))


def image_prompt(model, sizes, spec, seed=0):
    """One sample holding ``len(sizes)`` images (base tiles only when several), ids counted under ``spec``."""
    g = torch.Generator().manual_seed(seed)
    proc = LlavaOnevisionProcessor(model.cfg)
    tiled = len(sizes) == 1
    parts = [torch.randint(0, 200, (3,), generator=g)]
    for size in sizes:
        parts += [torch.full((proc.num_image_tokens(size, tiled, token_reduction=spec),), model.cfg.tokens.image_token_id),
                  torch.randint(0, 200, (2,), generator=g)]
    pins = model.cfg.processing.pinpoints(30)
    tiles = max(anyres.num_tiles(s, pins, 30) for s in sizes) if tiled else 1
    return dict(input_ids=torch.cat(parts)[None], pixel_values=torch.randn(len(sizes), tiles, 3, 30, 30, generator=g),
                image_sizes=torch.tensor(sizes), batch_num_images=torch.tensor([len(sizes)]))


@pytest.mark.parametrize("method", list(KEEP_ALL))
def test_keep_all_reproduces_unreduced_logits_for_single_tile_images(method):
    """Base-tile images (multi-image samples) keep their layout: keep-all == no reduction, bit for bit."""
    model = dense_model()
    inputs = image_prompt(model, [(60, 90), (40, 30)], KEEP_ALL[method])
    assert inputs["input_ids"].shape == image_prompt(model, [(60, 90), (40, 30)], None)["input_ids"].shape
    with torch.no_grad():
        base = model(**inputs).logits
        same = model(**inputs, token_reduction=KEEP_ALL[method]).logits
        reduced = model(**image_prompt(model, [(60, 90), (40, 30)], SPECS[method]), token_reduction=SPECS[method]).logits
    assert torch.equal(base, same)
    assert reduced.shape[1] < base.shape[1]


@pytest.mark.parametrize("spec", [*KEEP_ALL.values(), {"method": "visionzip", "keep": 25},
                                  {"method": "pooling", "keep": 25}], ids=[*KEEP_ALL, "visionzip-25", "pooling-25"])
def test_keep_all_on_an_anyres_image_is_the_unreduced_model(spec):
    """A reducer that drops nothing (keep 1.0, or the tile's 25 tokens) is no reduction: the anyres
    image keeps its unpadded grid with row newlines, the processor counts the unreduced tokens, the
    logits are the unreduced model's bit for bit, and FLOPs charge no scoring pass."""
    model = dense_model()
    size = (60, 90)
    proc = LlavaOnevisionProcessor(model.cfg)
    assert proc.num_image_tokens(size, token_reduction=spec) == proc.num_image_tokens(size, token_reduction=[])
    inputs = image_prompt(model, [size], spec)
    with torch.no_grad():
        base = model(**inputs, token_reduction=[]).logits
        same = model(**inputs, token_reduction=spec).logits
    assert torch.equal(base, same)
    n_visual = proc.num_image_tokens(size, token_reduction=[])
    tiles = anyres.num_tiles(size, model.cfg.processing.pinpoints(30), 30)
    plain = prefill_flops(model.cfg, n_visual, 8, tiles)
    kept = prefill_flops(model.cfg, n_visual, 8, tiles, token_reduction=spec)
    assert kept.total == plain.total and "vision_scoring" not in kept.components


@pytest.mark.parametrize("method", list(SPECS))
def test_a_reduced_anyres_image_is_the_tiles_in_order_then_one_newline(method):
    """No grid survives selection: a reduced image is base tile, tiles row-major, one newline (no unpad)."""
    model = dense_model()
    size = (60, 90)
    n_tiles = anyres.num_tiles(size, model.cfg.processing.pinpoints(30), 30)
    proc = LlavaOnevisionProcessor(model.cfg)
    pixels = torch.randn(1, n_tiles, 3, 30, 30)
    with torch.no_grad():
        (image,) = model.encode_images(pixels, torch.tensor([size]), reducer=model.reducers(SPECS[method])[0][0])
    assert image.shape[0] == proc.num_image_tokens(size, token_reduction=SPECS[method])
    torch.testing.assert_close(image[-1], model.image_newline, atol=0, rtol=0)


def manual_rows(model, pixels, size, name, spec):
    """The phase-1 function applied by hand to the model's tower output, then projected, tile by tile."""
    reducer = model.reducers(spec)[0][0]
    tiles = anyres.num_tiles(size, model.cfg.processing.pinpoints(30), 30)
    grid = anyres.tile_grid(size, model.cfg.processing.pinpoints(30), 30)
    tower = model.vision_tower
    if name == "pooling":
        out = pooling(tower(pixels), reducer)
    else:
        with TowerAttentionCapture(tower, tower_layers(reducer)) as cap:
            feats = tower(pixels)
        if name == "visionzip":
            out = visionzip(feats, cap.received(reducer.layer), cap.keys(reducer.layer), reducer)
        elif name == "vispruner":
            out = vispruner(feats, cap.received(reducer.layer), reducer)
        else:
            out = hired(feats, cap.received(reducer.budget_layer), cap.received(reducer.layer), [tiles], [grid], reducer)
    rows = [model.projector(out.features[i, : int(out.counts[i])]) for i in range(tiles)]
    return torch.cat(rows + [model.image_newline[None]]), out


@pytest.mark.parametrize("method", list(SPECS))
def test_rows_are_the_phase_one_choice_on_the_models_tower(method):
    model = dense_model()
    size = (60, 90)
    inputs = image_prompt(model, [size], SPECS[method], seed=3)
    pixels = inputs["pixel_values"][0]
    with torch.no_grad():
        embeds, visual, _ = model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                                        token_reduction=SPECS[method])
        expected, out = manual_rows(model, pixels, size, method, SPECS[method])
        if out.indices is not None:  # selections: each kept row is the projected tower token it names
            full = model.projector(model.vision_tower(pixels))
            index = out.indices[0, : int(out.counts[0])]
            if method != "visionzip":  # visionzip's contextual rows are merges, not copies
                torch.testing.assert_close(full[0, index], expected[: len(index)], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(embeds[visual], expected, atol=1e-6, rtol=1e-6)
    if method == "hired":
        assert len(set(out.counts.tolist())) > 1  # tiles really keep different counts


@pytest.mark.parametrize("method", ["hired", "visionzip"])
def test_padded_batch_with_different_kept_counts_equals_each_sample_alone(method):
    model = dense_model()
    spec = SPECS[method]
    sizes = [(60, 90), (45, 200), (30, 30)]
    proc = LlavaOnevisionProcessor(model.cfg)
    counts = [proc.num_image_tokens(s, token_reduction=spec) for s in sizes]
    assert len(set(counts)) == 3
    rows = []
    for i, size in enumerate(sizes):
        g = torch.Generator().manual_seed(i)
        rows.append((torch.cat([torch.randint(0, 200, (2 + i,), generator=g),
                                torch.full((counts[i],), model.cfg.tokens.image_token_id),
                                torch.randint(0, 200, (4,), generator=g)]), size))
    inputs = batch(model, rows)
    with torch.no_grad():
        logits = model(**inputs, token_reduction=spec).logits
        out = model.generate(**inputs, max_new_tokens=3, token_reduction=spec)
        for i in range(len(sizes)):
            alone_inputs = row_inputs(inputs, i, model)
            alone = model(**alone_inputs, token_reduction=spec).logits[0]
            real = inputs["attention_mask"][i].bool()
            torch.testing.assert_close(logits[i, real], alone, atol=2e-5, rtol=1e-4)
            alone_out = model.generate(**alone_inputs, max_new_tokens=3, token_reduction=spec)
            assert out[i, -3:].tolist() == alone_out[0, -3:].tolist()


def test_generate_with_the_processors_counts_per_call_and_from_the_card(tmp_path):
    from PIL import Image

    spec = [{"method": "visionzip", "keep": 8}, {"method": "fastv", "keep": 0.5, "layer": 2}]
    word_tokenizer(tmp_path, tiny_cfg(sa_layers=None))
    tokenizer = visorlib.processing.Tokenizer.from_pretrained(tmp_path)
    image = Image.fromarray(torch.randint(0, 255, (60, 90, 3), dtype=torch.uint8).numpy())
    prompt = "user <image> what is this ?"
    model = dense_model()
    proc = LlavaOnevisionProcessor(model.cfg, tokenizer)
    inputs = proc(text=prompt, images=image, token_reduction=spec)
    n_tiles = inputs["pixel_values"].shape[1]
    assert int((inputs["input_ids"] == model.cfg.tokens.image_token_id).sum()) == 8 * n_tiles + 1
    out = model.generate(**inputs, max_new_tokens=3, token_reduction=spec)
    carded = build(tiny_cfg(sa_layers=None).with_overrides({"token_reduction": spec}))
    card_inputs = LlavaOnevisionProcessor(carded.cfg, tokenizer)(text=prompt, images=image)
    assert torch.equal(card_inputs["input_ids"], inputs["input_ids"])
    assert torch.equal(carded.generate(**card_inputs, max_new_tokens=3), out)
    with pytest.raises(visorlib.InputError, match="under token_reduction visionzip"):
        model(**proc(text=prompt, images=image), token_reduction=spec)  # the processor was not told
    with pytest.raises(visorlib.InputError, match="under token_reduction visionzip"):
        carded(**proc(text=prompt, images=image))


@pytest.mark.parametrize("method", list(SPECS))
def test_visor_all_self_attention_plus_reducer_equals_dense_plus_reducer(method):
    dense = dense_model()
    visor = visorlib.visorize(copy.deepcopy(dense), {"sa_layers": list(range(6))}, warn=False)
    inputs = image_prompt(dense, [(60, 90)], SPECS[method])
    text = inputs["input_ids"] != dense.cfg.tokens.image_token_id
    with torch.no_grad():
        expected = dense(**inputs, token_reduction=SPECS[method]).logits
        got = visor(**inputs, token_reduction=SPECS[method]).logits
    assert torch.equal(got[text], expected[text])


@pytest.mark.parametrize("method", list(SPECS))
@pytest.mark.parametrize("packing", [1.0, 2.0], ids=["visor", "visor-tr"])
def test_visor_plans_and_packing_see_the_reduced_set(method, packing):
    """CA/SA layers attend to the reduced tokens only: the processor's reduced count runs, keep-all of
    a multi-image sample equals no reduction, and other pixels change the answer."""
    model = build(tiny_cfg(router=False, packing_ratio=packing))
    proc = LlavaOnevisionProcessor(model.cfg)
    per_tile = model.cfg.feature_grid_size**2
    assert per_tile == (25 if packing == 1.0 else 16)
    spec = SPECS[method]
    inputs = image_prompt(model, [(60, 90)], spec)
    n_tiles = inputs["pixel_values"].shape[1]
    kept = {"visionzip": 10, "vispruner": 12, "pooling": 4}.get(method)  # 2x2 of 5x5 or 4x4
    expected = (kept * n_tiles if kept else round(0.3 * n_tiles * per_tile)) + 1
    assert proc.num_image_tokens((60, 90), token_reduction=spec) == expected
    multi = image_prompt(model, [(60, 90), (40, 30)], KEEP_ALL[method])
    with torch.no_grad():
        a = model(**inputs, sa_layers=[1, 2], token_reduction=spec).logits
        b = model(**dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"])), sa_layers=[1, 2],
                  token_reduction=spec).logits
        same = model(**multi, sa_layers=[1, 4], token_reduction=KEEP_ALL[method]).logits
        base = model(**multi, sa_layers=[1, 4]).logits
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.equal(same, base)


def test_packing_maps_scores_onto_the_packed_grid():
    """Under VISOR-TR a packed token's score is the mean score of the area it covers (a 2x2 cell of the resize)."""
    import torch.nn.functional as F

    from visorlib.visor.reduction import PackedCapture

    class Fixed:
        def received(self, layer):
            return torch.arange(25.0).view(1, 25)

        def keys(self, layer):
            return torch.arange(50.0).view(1, 25, 2)

    mapped = PackedCapture(Fixed(), side=4)
    grid = F.interpolate(torch.arange(25.0).view(1, 1, 5, 5), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(mapped.received(0), F.avg_pool2d(grid, 2).flatten(1))
    assert mapped.keys(0).shape == (1, 16, 2)


def fastvlm():
    return build(tiny_cfg(card="fastvlm-0.5b", sa_layers=None))


def test_fastvlm_pools_its_grid_and_refuses_attention_scored_methods():
    model = fastvlm()
    size = (60, 90)
    proc = LlavaOnevisionProcessor(model.cfg)
    assert proc.num_image_tokens(size) == 4 and proc.num_image_tokens(size, token_reduction={"method": "pooling",
                                                                                             "keep": 1}) == 1
    ids, _ = sample(model, size, routing=False)
    pixels = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        base = model(ids[None], pixel_values=pixels).logits
        same = model(ids[None], pixel_values=pixels, token_reduction={"method": "pooling", "keep": 1.0}).logits
        pooled_ids = torch.cat([ids[:3], ids[3:4], ids[7:]])  # 4 image tokens -> 1
        pooled = model(pooled_ids[None], pixel_values=pixels, token_reduction={"method": "pooling", "keep": 1}).logits
    assert torch.equal(base, same)  # one tile, no newline: keep-all is the unreduced layout
    assert pooled.shape[1] == base.shape[1] - 3
    for method in ("visionzip", "vispruner", "hired"):
        with pytest.raises(ReductionSpecError, match="does not expose its attention"):
            model(ids[None], pixel_values=pixels, token_reduction={"method": method, "keep": 1})


def test_bad_inputs_are_refused_clearly():
    model = dense_model()
    inputs = image_prompt(model, [(60, 90)], None)
    with pytest.raises(ReductionSpecError, match="larger than"):
        model(**inputs, token_reduction={"method": "visionzip", "keep": 26})
    with pytest.raises(ReductionSpecError, match="larger than"):
        LlavaOnevisionProcessor(model.cfg).num_image_tokens((60, 90), token_reduction={"method": "vispruner", "keep": 26})
    video = torch.randn(1, 2, 3, 30, 30)
    ids = torch.cat([torch.tensor([5, 6]), torch.full((2 * 9 + 1,), model.cfg.tokens.video_token_id)])[None]
    with torch.no_grad():
        model(ids, pixel_values_videos=video)  # videos run without a pre-LLM method ...
        model(ids, pixel_values_videos=video, token_reduction={"method": "fastv", "keep": 0.5, "layer": 2})
    with pytest.raises(ReductionSpecError, match="pre-LLM reduction of videos is not supported"):
        model(ids, pixel_values_videos=video, token_reduction={"method": "pooling"})
    with pytest.raises(ReductionSpecError, match="pre-LLM reduction of videos is not supported"):
        LlavaOnevisionProcessor(model.cfg)(videos=[torch.zeros(2, 30, 30, 3)], token_reduction={"method": "pooling"})
