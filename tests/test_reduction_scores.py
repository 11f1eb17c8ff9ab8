"""Attention scores for token reduction and the in-LLM selections, against eager references.

Every reference here materialises the full attention matrix with plain eager math, exactly what
the library avoids; the library's blocked / few-query scores must match it to 1e-6 (float32).
"""

import math

import pytest
import torch

import visorlib
from visorlib.config import VisionConfig
from visorlib.models.llava_onevision.siglip import SiglipVisionTower
from visorlib.visor.reduction import (
    FastV,
    PyramidDrop,
    ReductionSpecError,
    TowerAttentionCapture,
    fastv_select,
    keep_counts,
    prune_points,
    pyramiddrop_select,
    query_attention,
    received_attention,
    select_top,
    take,
)

TOL = 1e-6


def tiny_tower(layers=3):
    """A SigLIP tower with an 8x8 grid (64 tokens per tile), 3 blocks."""
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=56, patch_size=7, hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=4)
    return SiglipVisionTower(cfg).eval()


def card_tower(card):
    """The vision tower of a zoo card's tiny model, built the way the model builds it."""
    torch.manual_seed(0)
    return visorlib.zoo.instantiate(visorlib.get_config(card).tiny()).vision_tower.eval()


def eager_tower(tower, pixels):
    """The tower re-run by hand, returning its output and every block's full attention ``[N, H, T, T]``."""
    x = tower.norm_pre(tower._pos_embed(tower.patch_embed(pixels)))
    maps = []
    for block in tower.blocks:
        attn = block.attn
        h = block.norm1(x)
        n, t, c = h.shape
        q, k, v = attn.qkv(h).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
        maps.append((probs, k))
        x = x + attn.proj((probs @ v).transpose(1, 2).reshape(n, t, c))
        x = x + block.mlp(block.norm2(x))
    return x, maps


@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
def test_blocked_received_attention_equals_the_materialised_matrix(chunk):
    torch.manual_seed(1)
    q, k = torch.randn(3, 4, 37, 8) * 2, torch.randn(3, 4, 37, 8) * 2
    full = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)        # [N, H, T, T]
    reference = full.mean(dim=1).mean(dim=1)                                     # received, over heads and queries
    got = received_attention(q, k, chunk=chunk)
    assert got.shape == (3, 37)
    torch.testing.assert_close(got, reference, atol=TOL, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(3), atol=TOL, rtol=0)


@pytest.mark.parametrize("source", ["8x8", "llava-ov-0.5b"])
def test_capture_reads_the_towers_own_q_k_without_changing_its_output(source):
    tower = tiny_tower() if source == "8x8" else card_tower(source)
    side = tower.cfg.image_size
    pixels = torch.randn(2, 3, side, side)
    with torch.no_grad():
        plain = tower(pixels)
        with TowerAttentionCapture(tower, layers=(0, -1)) as cap:
            hooked = tower(pixels)
        reference, maps = eager_tower(tower, pixels)
        after = tower(pixels)
    assert tower.blocks[0].attn.fused_attn == SiglipVisionTower(tower.cfg).blocks[0].attn.fused_attn
    torch.testing.assert_close(hooked, plain, atol=0, rtol=0)
    torch.testing.assert_close(reference, plain, atol=1e-5, rtol=1e-5)   # the eager re-run is the same network
    assert not tower.blocks[0].attn.q_norm._forward_hooks                  # hooks are gone after the block
    torch.testing.assert_close(after, plain, atol=0, rtol=0)
    for layer, (probs, k) in ((0, maps[0]), (-1, maps[-1])):
        torch.testing.assert_close(cap.received(layer, chunk=7), probs.mean(1).mean(1), atol=TOL, rtol=0)
        torch.testing.assert_close(cap.keys(layer), k.mean(1), atol=TOL, rtol=0)


@pytest.mark.parametrize("card", ["qwen2-vl-2b", "fastvlm-0.5b"])
def test_capture_refuses_towers_without_exposed_attention_and_bad_layers(card):
    with pytest.raises(ReductionSpecError, match="does not expose its attention.*visionzip"):
        TowerAttentionCapture(card_tower(card), layers=(-1,))
    with pytest.raises(ValueError, match="tower layer 3 is out of range for a 3-block"):
        TowerAttentionCapture(tiny_tower(), layers=(3,))


def naive_query_scores(q, k, query_pos, key_valid, visual_index, visual_valid):
    """Full ``[B, Hq, L, L]`` causal attention with kv heads looked up per query head, rows read at the queries."""
    b, hq, _, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    out = torch.full(visual_index.shape, float("-inf"))
    for s in range(b):
        rows = []
        for h in range(hq):
            kh = k[s, h // (hq // hkv)]
            # A full query matrix: the chosen queries placed at their positions, the rest random.
            full_q = torch.randn(length, d)
            full_q[query_pos[s]] = q[s, h]
            logits = full_q @ kh.T / math.sqrt(d)
            allowed = torch.ones(length, length).tril().bool() & key_valid[s][None, :]
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            rows.append(probs[query_pos[s]])
        mean = torch.stack(rows).mean(dim=(0, 1))
        for j in range(visual_index.shape[1]):
            if visual_valid[s, j]:
                out[s, j] = mean[visual_index[s, j]]
    return out


def test_query_attention_is_gqa_aware_and_equals_the_full_matrix():
    torch.manual_seed(2)
    b, hq, hkv, length, d = 2, 6, 2, 19, 8
    q, k = torch.randn(b, hq, 2, d), torch.randn(b, hkv, length, d)
    query_pos = torch.tensor([[17, 18], [15, 16]])
    key_valid = torch.ones(b, length, dtype=torch.bool)
    key_valid[1, :2] = False                                   # left padding of sample 1
    visual_index = torch.tensor([[3, 4, 5, 6, 7], [5, 6, 7, 8, 0]])
    visual_valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    got = query_attention(q, k, query_pos, key_valid, visual_index, visual_valid)
    reference = naive_query_scores(q, k, query_pos, key_valid, visual_index, visual_valid)
    torch.testing.assert_close(got, reference, atol=TOL, rtol=0)
    assert got[1, 4] == float("-inf")


def test_query_attention_of_a_padded_batch_equals_each_sample_alone():
    torch.manual_seed(3)
    hq, hkv, d = 4, 2, 8
    lengths, visual = [12, 17], [(2, 6), (3, 11)]           # (first visual position, count) per sample
    total = max(lengths)
    q, k = torch.randn(2, hq, 1, d), torch.randn(2, hkv, total, d)
    key_valid = torch.zeros(2, total, dtype=torch.bool)
    visual_index = torch.zeros(2, 11, dtype=torch.long)
    visual_valid = torch.zeros(2, 11, dtype=torch.bool)
    for s, (n, (start, count)) in enumerate(zip(lengths, visual, strict=True)):
        pad = total - n
        key_valid[s, pad:] = True
        visual_index[s, :count] = torch.arange(pad + start, pad + start + count)
        visual_valid[s, :count] = True
    batch = query_attention(q, k, torch.tensor([[total - 1]] * 2), key_valid, visual_index, visual_valid)
    for s, (n, (start, count)) in enumerate(zip(lengths, visual, strict=True)):
        pad = total - n
        alone = query_attention(q[s:s + 1], k[s:s + 1, :, pad:], torch.tensor([[n - 1]]),
                                torch.ones(1, n, dtype=torch.bool), torch.arange(start, start + count)[None],
                                torch.ones(1, count, dtype=torch.bool))
        torch.testing.assert_close(batch[s, :count], alone[0], atol=TOL, rtol=0)
        kept_b, len_b = select_top(batch, visual_valid, [max(1, count // 2)] * 2)
        kept_a, _ = select_top(alone, torch.ones(1, count, dtype=torch.bool), [max(1, count // 2)])
        assert kept_b[s, : len_b[s]].tolist() == kept_a[0].tolist()


def naive_top(scores, n_valid, count):
    ranked = sorted(range(n_valid), key=lambda j: -float(scores[j]))
    return sorted(ranked[:count])


def test_select_top_variable_counts_per_sample():
    torch.manual_seed(4)
    scores = torch.randn(3, 10)
    valid = torch.zeros(3, 10, dtype=torch.bool)
    for s, n in enumerate((10, 4, 7)):
        valid[s, :n] = True
    counts = [5, 1, 7]
    indices, lengths = select_top(scores, valid, counts)
    assert indices.shape == (3, 7) and lengths.tolist() == counts
    for s, n in enumerate((10, 4, 7)):
        assert indices[s, : counts[s]].tolist() == naive_top(scores[s], n, counts[s])
        assert (indices[s, counts[s]:] == -1).all()
    feats = torch.randn(3, 10, 2)
    gathered = take(feats, indices)
    assert torch.equal(gathered[1, 0], feats[1, indices[1, 0]]) and (gathered[1, 1:] == 0).all()
    with pytest.raises(ReductionSpecError, match="sample 1: cannot keep 5 of its 4"):
        select_top(scores, valid, [5, 5, 5])


def test_fastv_keeps_the_share_and_checks_its_layer():
    torch.manual_seed(5)
    spec = FastV()                                       # keep 0.5 after layer 2 (R = 50 %, K = 2)
    assert prune_points(spec, 24)[0].layer == 2 and prune_points(spec, 24)[0].score_layer == 1
    scores, valid = torch.randn(2, 9), torch.ones(2, 9, dtype=torch.bool)
    valid[1, 5:] = False
    indices, lengths = fastv_select(scores, valid, spec, 24)
    assert lengths.tolist() == [4, 2]                    # round(9 * 0.5) = 4 (half to even), round(5 * 0.5) = 2
    assert indices[0, :4].tolist() == naive_top(scores[0], 9, 4)
    keep_all, n_all = fastv_select(scores, valid, FastV(keep=1.0), 24)
    assert keep_all[0].tolist() == list(range(9)) and n_all.tolist() == [9, 5]
    with pytest.raises(ValueError, match="fastv: 'layer' 24 is out of range 1..23 for a 24-layer decoder"):
        fastv_select(scores, valid, FastV(layer=24), 24)
    with pytest.raises(ValueError, match="fastv, sample 1: .*'keep' count 6 is larger than the 5"):
        keep_counts(FastV(keep=6), [9, 5], 24)


def test_pyramiddrop_stages_follow_the_paper_and_shrink_per_sample():
    spec = PyramidDrop()
    assert [p.layer for p in prune_points(spec, 24)] == [1, 6, 12]          # stages 2-6, 7-12, 13-24 (1-indexed)
    assert spec.stages(24, 1000) == [(0, 1000), (1, 300), (6, 200), (12, 100)]
    assert [layer for layer, _ in spec.stages(28, 10)] == [0, 1, 7, 14]       # rescaled for another depth
    assert PyramidDrop(keep=0.05).stages(24, 1000) == [(0, 1000), (1, 150), (6, 100), (12, 50)]
    torch.manual_seed(6)
    scores, valid = torch.randn(2, 20), torch.ones(2, 20, dtype=torch.bool)
    valid[1, 10:] = False
    indices, lengths = pyramiddrop_select(scores, valid, spec, 24, stage=1)
    assert lengths.tolist() == [6, 3]
    assert indices[1, :3].tolist() == naive_top(scores[1], 10, 3)
    with pytest.raises(ValueError, match="stage layer 30 is out of range for a 24-layer decoder"):
        prune_points(PyramidDrop(layers=(0, 10, 20, 30)), 24)


def test_in_llm_keep_all_keeps_every_valid_slot():
    scores, valid = torch.randn(2, 8), torch.ones(2, 8, dtype=torch.bool)
    valid[0, 6:] = False
    spec = PyramidDrop(layers=(0, 2), ratios=(1.0, 1.0), keep=1.0)
    indices, lengths = pyramiddrop_select(scores, valid, spec, 4, stage=1)
    assert lengths.tolist() == [6, 8] and indices[0, :6].tolist() == list(range(6)) and indices[0, 6:].eq(-1).all()
    assert indices[1].tolist() == list(range(8))
