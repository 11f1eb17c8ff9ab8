"""Token-reduction specs, the pre-LLM methods against naive per-tile references, and token accounting."""

import math

import pytest
import torch
from test_reduction_scores import card_tower, eager_tower, tiny_tower

from visorlib.validation import InputError
from visorlib.visor.reduction import (
    REDUCERS,
    HiRED,
    Pooling,
    Reducer,
    ReductionSpecError,
    TowerAttentionCapture,
    VisionZip,
    VisPruner,
    apply_pre_llm,
    apportion,
    encode_and_reduce,
    hired,
    hired_budgets,
    parse_reduction,
    pooled_side,
    pooling,
    pre_llm_tokens,
    register_reducer,
    tokens_per_layer,
    tokens_per_layer_batch,
    visionzip,
    vispruner,
)

# ---------------------------------------------------------------- naive references, written from each rule


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def ranked(scores):
    return sorted(range(len(scores)), key=lambda j: -float(scores[j]))


def naive_visionzip(feats, scores, keys, n_dom, n_ctx):
    """One tile: (rows, source index per row), rows in tile order."""
    dominant = sorted(ranked(scores)[:n_dom])
    rest = [j for j in range(len(scores)) if j not in dominant]
    targets = rest[:: max(1, len(rest) // n_ctx)][:n_ctx] if n_ctx else []
    groups = {t: [] for t in targets}
    for j in rest if targets else []:       # no contextual tokens: the rest is dropped
        if j not in targets:
            best = max(targets, key=lambda t: cos(keys[j], keys[t]))
            groups[best].append(j)
    rows = {j: feats[j] for j in dominant}
    for t, members in groups.items():
        rows[t] = feats[t] + (torch.stack([feats[m] for m in members]).mean(0) if members else 0)
    order = sorted(rows)
    return torch.stack([rows[j] for j in order]), order


def naive_vispruner(feats, scores, n_imp, n_div, step):
    order = ranked(scores)
    important, residual = order[:n_imp], order[n_imp:] if n_div else []
    while len(residual) - n_div > 0:
        r = min(step, len(residual) - n_div)
        a, b = residual[0::2], residual[1::2]
        similarity = {x: max(cos(feats[x], feats[y]) for y in b) for x in a}
        residual = sorted(a, key=lambda x: -similarity[x])[r:] + b
    return sorted(important + residual)


def naive_pool(feats, side):
    grid = math.isqrt(feats.shape[0])
    tokens = feats.reshape(grid, grid, -1)
    out = []
    for i in range(side):
        for j in range(side):
            r0, r1 = i * grid // side, -(-(i + 1) * grid // side)
            c0, c1 = j * grid // side, -(-(j + 1) * grid // side)
            out.append(tokens[r0:r1, c0:c1].reshape(-1, feats.shape[1]).mean(0))
    return torch.stack(out)


def naive_hired_budgets(budget_scores, grid, keep, alpha):
    n, t = budget_scores.shape
    total = round(keep * n * t)
    if n == 1:
        return [total]
    rows, cols = grid
    base = min(int(total * alpha), t)
    side = math.isqrt(t)
    weights = [0] * (rows * cols)
    for j in ranked(budget_scores[0])[: int(t * (1 - alpha))]:
        r, c = divmod(j, side)
        weights[(r * rows // side) * cols + c * cols // side] += 1
    return [base] + apportion([float(w) for w in weights], total - base, t)


# ---------------------------------------------------------------- specs


def test_parse_defaults_follow_the_paper_and_round_trip():
    vz, vp, hr, pool, fv, pd = (parse_reduction({"method": m})[0] for m in
                                ("visionzip", "vispruner", "hired", "pooling", "fastv", "pyramiddrop"))
    assert vz.keep == 128 and vz.split(128) == (104, 24)
    assert vp.keep == 128 and vp.split(128) == (96, 32)
    assert (hr.keep, hr.alpha) == (0.2, 0.5) and pool.keep == 0.125
    assert (fv.keep, fv.layer) == (0.5, 2) and pd.ratios == (1.0, 0.3, 0.2, 0.1)
    assert [r.where for r in (vz, vp, hr, pool, fv, pd)] == ["pre_llm"] * 4 + ["in_llm"] * 2
    for r in (vz, vp, hr, pool, fv, pd):
        assert parse_reduction(r.to_dict()) == [r]
    pair = parse_reduction([{"method": "pooling", "keep": 0.25}, {"method": "pyramiddrop", "ratios": [1.0, 0.5]
                                                                   , "layers": [0, 4]}])
    assert pair[1].keep == 0.5 and parse_reduction(None) == []


def test_a_registered_plugin_is_parsed_like_the_builtins():
    from dataclasses import dataclass

    @register_reducer("everyother")
    @dataclass(frozen=True)
    class EveryOther(Reducer):
        keep: int | float = 0.5
        offset: int = 0

    try:
        assert parse_reduction({"method": "everyother", "offset": 1}) == [EveryOther(offset=1)]
        with pytest.raises(ReductionSpecError, match="unknown key 'stride' for everyother"):
            parse_reduction({"method": "everyother", "stride": 2})
        with pytest.raises(ValueError, match="already registered"):
            register_reducer("everyother")(EveryOther)
    finally:
        REDUCERS.pop("everyother")


@pytest.mark.parametrize(("spec", "message"), [
    ({"method": "tome"}, "unknown method 'tome'"),
    ({"keep": 0.5}, "missing 'method'"),
    ("visionzip", "expected a dict"),
    ({"method": "visionzip", "ratio": 0.5}, "unknown key 'ratio' for visionzip"),
    ({"method": "fastv", "keep": 0.0}, "'keep' share 0.0 is out of range"),
    ({"method": "fastv", "keep": 1.5}, "'keep' share 1.5 is out of range"),
    ({"method": "fastv", "keep": 0}, "'keep' count 0 must be >= 1"),
    ({"method": "fastv", "keep": True}, "'keep' must be a share"),
    ({"method": "fastv", "keep": "half"}, "'keep' must be a share"),
    ({"method": "fastv", "layer": 0}, "'layer' must be an int >= 1"),
    ({"method": "visionzip", "dominant_ratio": 1.2}, "'dominant_ratio' = 1.2 is out of range"),
    ({"method": "vispruner", "step": 0}, "'step' must be an int >= 1"),
    ({"method": "hired", "alpha": -0.1}, "'alpha' = -0.1 is out of range"),
    ({"method": "pyramiddrop", "ratios": [1.0, 0.2, 0.5, 0.1]}, "must not increase"),
    ({"method": "pyramiddrop", "ratios": [1.0, 0.5]}, "need their stage 'layers'"),
    ({"method": "pyramiddrop", "layers": [0, 3], "ratios": [1.0, 0.5, 0.2]}, "2 'layers' but 3 'ratios'"),
    ({"method": "pyramiddrop", "layers": [0, 6, 3, 9]}, "'layers' \\[0, 6, 3, 9\\] must increase"),
    ({"method": "pyramiddrop", "keep": 0.3}, None),
    ({"method": "pyramiddrop", "keep": 0.3, "ratios": [1.0, 0.5, 0.4, 0.2]}, "differs from the last of 'ratios'"),
    ([{"method": "visionzip"}, {"method": "pooling"}], "at most one pre-LLM method"),
    ([{"method": "fastv"}, {"method": "visionzip"}], "at most one pre-LLM method"),
    ([{"method": "fastv"}, {"method": "pyramiddrop"}], "at most one pre-LLM method"),
])
def test_bad_specs_are_refused_naming_the_key(spec, message):
    if message is None:
        parse_reduction(spec)
        return
    with pytest.raises(ReductionSpecError, match=message) as err:
        parse_reduction(spec, where="token_reduction")
    assert isinstance(err.value, InputError) and "token_reduction" in str(err.value)


# ---------------------------------------------------------------- pre-LLM methods


def random_tiles(n=3, t=49, d=6, dk=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, t, d, generator=g), torch.rand(n, t, generator=g), torch.randn(n, t, dk, generator=g))


@pytest.mark.parametrize("keep", [128, 20, 0.3, 1])
def test_visionzip_equals_the_naive_rule(keep):
    feats, scores, keys = random_tiles(t=144)
    spec = VisionZip(keep=keep)
    out = visionzip(feats, scores, keys, spec)
    kept = keep if isinstance(keep, int) else round(keep * 144)
    assert out.features.shape == (3, kept, 6) and out.counts.tolist() == [kept] * 3
    for i in range(3):
        rows, order = naive_visionzip(feats[i], scores[i], keys[i], *spec.split(kept))
        assert out.indices[i].tolist() == order
        torch.testing.assert_close(out.features[i], rows, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("keep", "step"), [(20, 8), (0.5, 3), (1, 8), (30, 1)])
def test_vispruner_equals_the_naive_rule(keep, step):
    feats, scores, _ = random_tiles(t=64, seed=1)
    spec = VisPruner(keep=keep, step=step)
    out = vispruner(feats, scores, spec)
    kept = keep if isinstance(keep, int) else round(keep * 64)
    for i in range(3):
        expected = naive_vispruner(feats[i], scores[i], *spec.split(kept), step)
        assert out.indices[i].tolist() == expected
        torch.testing.assert_close(out.features[i], feats[i, expected], atol=0, rtol=0)


def test_pooling_equals_windowed_means_on_the_siglip_grid():
    assert [pooled_side(27, k) for k in (1.0, 0.25, 0.125, 0.0625)] == [27, 13, 10, 7]
    feats = torch.randn(2, 729, 3)
    for keep, side in ((0.125, 10), (49, 7), (0.25, 13)):
        out = pooling(feats, Pooling(keep=keep))
        assert out.features.shape == (2, side * side, 3) and out.indices is None
        for i in range(2):
            torch.testing.assert_close(out.features[i], naive_pool(feats[i], side), atol=1e-6, rtol=0)
    with pytest.raises(ReductionSpecError, match="perfect square"):
        pooling(feats, Pooling(keep=120))


def test_apportion_sums_to_the_budget_and_respects_the_cap():
    assert apportion([3.0, 1.0], 8, 10) == [6, 2]
    assert apportion([1.0, 1.0, 1.0], 10, 10) == [4, 3, 3]
    assert apportion([10.0, 1.0, 0.0], 15, 8) == [8, 7, 0]
    assert apportion([1.0, 0.0, 0.0], 20, 8) == [8, 6, 6]          # room only left in zero-weight tiles
    assert apportion([0.0, 0.0], 5, 8) == [3, 2]
    weights = [5.0, 0.0, 2.0, 7.0, 1.0]
    got = apportion(weights, 37, 20)
    assert sum(got) == 37 and all(abs(g - 37 * w / 15) < 1 for g, w in zip(got, weights, strict=True))


def test_hired_budgets_and_tokens_equal_the_naive_rule_and_batch_equals_alone():
    torch.manual_seed(3)
    t = 36                                              # 6x6 grid per tile
    images = [(5, (2, 2)), (1, (0, 0)), (7, (2, 3))]    # (tiles incl. base, layout of the others)
    n = sum(tiles for tiles, _ in images)
    feats, budget_scores, select_scores = torch.randn(n, t, 4), torch.rand(n, t), torch.rand(n, t)
    spec = HiRED(keep=0.2, alpha=0.5)
    out = hired(feats, budget_scores, select_scores, [i[0] for i in images], [i[1] for i in images], spec)
    start = 0
    for tiles, grid in images:
        budgets = naive_hired_budgets(budget_scores[start:start + tiles], grid, 0.2, 0.5)
        assert budgets == hired_budgets(budget_scores[start:start + tiles], grid, spec)
        assert sum(budgets) == pre_llm_tokens(spec, t, tiles)
        alone = hired(feats[start:start + tiles], budget_scores[start:start + tiles],
                      select_scores[start:start + tiles], [tiles], [grid], spec)
        for k, count in enumerate(budgets):
            row = start + k
            expected = sorted(ranked(select_scores[row])[:count])
            assert out.counts[row] == count and out.indices[row, :count].tolist() == expected
            assert (out.indices[row, count:] == -1).all() and (out.features[row, count:] == 0).all()
            torch.testing.assert_close(out.features[row, :count], feats[row, expected], atol=0, rtol=0)
            assert alone.indices[k, :count].tolist() == expected
        start += tiles
    assert len(set(out.counts[1:5].tolist())) > 1      # tiles of one image get different budgets
    with pytest.raises(ReductionSpecError, match="grid 2x2 does not match the 6 tiles"):
        hired_budgets(budget_scores[:7], (2, 2), spec)


def test_keep_all_reproduces_the_tiles_exactly():
    feats, scores, keys = random_tiles(t=49)
    for out in (visionzip(feats, scores, keys, VisionZip(keep=1.0)), vispruner(feats, scores, VisPruner(keep=1.0)),
                pooling(feats, Pooling(keep=1.0)),
                hired(feats, scores, scores, [3], [(1, 2)], HiRED(keep=1.0))):
        assert torch.equal(out.features, feats)
        assert out.indices is None or out.indices.tolist() == [list(range(49))] * 3


def test_a_keep_count_above_the_tile_is_an_error():
    feats, scores, keys = random_tiles(t=49)
    with pytest.raises(ReductionSpecError, match="'keep' count 128 is larger than the 49 visual tokens of a tile"):
        visionzip(feats, scores, keys, VisionZip())
    with pytest.raises(ReductionSpecError, match="'keep' count 50 per tile is larger"):
        hired_budgets(scores, (1, 2), HiRED(keep=50))


def test_methods_on_a_tiny_siglip_tower_equal_the_eager_reference():
    tower = tiny_tower()                                 # 8x8 = 64 tokens per tile
    pixels = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        with TowerAttentionCapture(tower, layers=(0, -1)) as cap:
            feats = tower(pixels)
        _, maps = eager_tower(tower, pixels)
    received = [probs.mean(1).mean(1) for probs, _ in maps]
    keys = maps[-1][1].mean(1)
    spec = VisionZip(keep=16)
    out = apply_pre_llm(spec, feats, cap)
    for i in range(5):
        rows, order = naive_visionzip(feats[i], received[-1][i], keys[i], *spec.split(16))
        assert out.indices[i].tolist() == order
        torch.testing.assert_close(out.features[i], rows, atol=1e-5, rtol=1e-5)
    out = apply_pre_llm(VisPruner(keep=16), feats, cap)
    for i in range(5):
        assert out.indices[i].tolist() == naive_vispruner(feats[i], received[-1][i], 12, 4, 8)
    spec = HiRED(keep=0.25)
    out = apply_pre_llm(spec, feats, cap, tiles_per_image=[5], grids=[(2, 2)])
    budgets = naive_hired_budgets(received[0], (2, 2), 0.25, 0.5)
    assert out.counts.tolist() == budgets
    for i, count in enumerate(budgets):
        assert out.indices[i, :count].tolist() == sorted(ranked(received[-1][i])[:count])
    with pytest.raises(ReductionSpecError, match="run the tower inside a TowerAttentionCapture"):
        apply_pre_llm(VisionZip(keep=16), feats)


# ---------------------------------------------------------------- token accounting


def test_tokens_per_layer_for_each_method_at_7371_visual_tokens():
    # 1000x1000 image in LLaVA-OV: base + 3x3 tiles of 729 tokens, plus 81 row-newline tokens = 7371.
    n, tiles = 7371, dict(tiles=[10], tile_tokens=729)
    assert tokens_per_layer(None, n, 24) == [n] * 24
    assert tokens_per_layer({"method": "visionzip"}, n, 24, **tiles) == [10 * 128 + 81] * 24
    assert tokens_per_layer({"method": "vispruner", "keep": 64}, n, 24, **tiles) == [10 * 64 + 81] * 24
    assert tokens_per_layer({"method": "pooling"}, n, 24, **tiles) == [10 * 100 + 81] * 24
    assert tokens_per_layer({"method": "hired"}, n, 24, **tiles) == [round(0.2 * 7290) + 81] * 24
    assert tokens_per_layer({"method": "fastv"}, n, 24) == [n] * 2 + [round(n / 2)] * 22
    pdrop = tokens_per_layer({"method": "pyramiddrop"}, n, 24)
    assert pdrop == [n] + [round(0.3 * n)] * 5 + [round(0.2 * n)] * 6 + [round(0.1 * n)] * 12
    both = tokens_per_layer([{"method": "visionzip"}, {"method": "fastv"}], n, 24, **tiles)
    assert both == [1361] * 2 + [round(1361 / 2)] * 22
    batch = tokens_per_layer_batch({"method": "fastv", "keep": 100}, [500, 300], 4)
    assert batch == [[500, 500, 100, 100], [300, 300, 100, 100]]
    with pytest.raises(ReductionSpecError, match="pass tiles= and tile_tokens="):
        tokens_per_layer({"method": "visionzip"}, n, 24)
    with pytest.raises(ReductionSpecError, match="'keep' count 400 is larger than the 300"):
        tokens_per_layer_batch({"method": "fastv", "keep": 400}, [500, 300], 4)


def test_counts_of_the_functions_match_the_accounting():
    feats, scores, keys = random_tiles(n=4, t=49)
    for spec, out in ((VisionZip(keep=0.3), visionzip(feats, scores, keys, VisionZip(keep=0.3))),
                      (VisPruner(keep=10), vispruner(feats, scores, VisPruner(keep=10))),
                      (Pooling(keep=0.25), pooling(feats, Pooling(keep=0.25))),
                      (HiRED(keep=0.3), hired(feats, scores, scores, [4], [(1, 3)], HiRED(keep=0.3)))):
        assert int(out.counts.sum()) == pre_llm_tokens(spec, 49, 4), spec.name


def test_each_tile_of_a_batch_equals_the_tile_alone():
    feats, scores, keys = random_tiles(n=4, t=49, seed=5)
    for run in (lambda f, s, k: visionzip(f, s, k, VisionZip(keep=12)),
                lambda f, s, k: vispruner(f, s, VisPruner(keep=12, step=3)),
                lambda f, s, k: pooling(f, Pooling(keep=0.25))):
        batch = run(feats, scores, keys)
        for i in range(4):
            alone = run(feats[i:i + 1], scores[i:i + 1], keys[i:i + 1])
            torch.testing.assert_close(batch.features[i:i + 1], alone.features, atol=1e-6, rtol=0)
            assert alone.indices is None or torch.equal(batch.indices[i:i + 1], alone.indices)


def test_encode_and_reduce_runs_the_tower_once_and_equals_the_manual_path():
    tower = card_tower("llava-ov-0.5b")                  # 5x5 = 25 tokens per tile, 2 blocks
    pixels = torch.randn(3, 3, tower.cfg.image_size, tower.cfg.image_size)
    for spec in (VisionZip(keep=9), VisPruner(keep=0.4), HiRED(keep=0.5), Pooling(keep=0.25)):
        features, out = encode_and_reduce(tower, pixels, spec, tiles_per_image=[3], grids=[(1, 2)])
        assert features.requires_grad                     # no no_grad: a recipe can train through it
        features = features.detach()
        with torch.no_grad():
            _, maps = eager_tower(tower, pixels)
            torch.testing.assert_close(features, tower(pixels), atol=0, rtol=0)
        received = [probs.mean(1).mean(1) for probs, _ in maps]
        if isinstance(spec, VisionZip):
            expected = [naive_visionzip(features[i], received[-1][i], maps[-1][1].mean(1)[i], *spec.split(9))[1]
                        for i in range(3)]
        elif isinstance(spec, VisPruner):
            expected = [naive_vispruner(features[i], received[-1][i], *spec.split(10), 8) for i in range(3)]
        elif isinstance(spec, HiRED):
            budgets = naive_hired_budgets(received[0], (1, 2), 0.5, 0.5)
            expected = [sorted(ranked(received[-1][i])[:c]) for i, c in enumerate(budgets)]
        else:
            assert out.indices is None and out.features.shape == (3, 4, features.shape[-1])
            continue
        assert [row[: int(c)].tolist() for row, c in zip(out.indices, out.counts, strict=True)] == expected
    with pytest.raises(ReductionSpecError, match="does not expose its attention"):
        encode_and_reduce(card_tower("qwen2-vl-2b"), pixels, VisionZip(keep=9))
