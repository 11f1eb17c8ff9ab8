"""The bad-input catalogue (issue 8, model inputs and images): every case is a clear InputError.

Each case asserts the exception type *and* that the message names the offending argument and
sample / image, never a bare torch error; positive cases check that the inputs that are accepted
(16-bit images, floats on the 0-255 scale) give the right values.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from visor_helpers import batch, sample, tiny_cfg

import visorlib
from visorlib.config import ConfigError
from visorlib.models.llava_onevision import LlavaOnevisionProcessor
from visorlib.models.qwen2_vl import Qwen2VLProcessor
from visorlib.processing import anyres, preprocess_images
from visorlib.processing.image import to_chw_tensor
from visorlib.validation import InputError, check_media_per_sample
from visorlib.visor.plan import validate_sa_layers


def _build(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return visorlib.zoo.instantiate(cfg).eval()


@pytest.fixture(scope="module")
def dense():
    return _build(visorlib.get_config("llava-ov-0.5b").tiny())


@pytest.fixture(scope="module")
def visor():
    """A 6-layer VISOR model with a router, built as ``build`` makes it (router untrained)."""
    return _build(tiny_cfg())


@pytest.fixture(scope="module")
def qwen():
    return _build(visorlib.get_config("qwen2-vl-2b").tiny())


def image_batch(model, sizes, text=3):
    """Two one-image samples, left-padded, with real processor pixels."""
    proc = LlavaOnevisionProcessor(model.cfg)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    vision = proc(images=images)
    rows = [torch.cat([torch.randint(0, 200, (text,)), torch.full((proc.num_image_tokens(s),), 250),
                       torch.randint(0, 200, (text,))]) for s in sizes]
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    return dict(input_ids=ids, attention_mask=mask, **vision)


def ids_with_image(model, size=(60, 90)):
    n = LlavaOnevisionProcessor(model.cfg).num_image_tokens(size)
    ids = torch.cat([torch.randint(0, 200, (1, 2)), torch.full((1, n), model.cfg.tokens.image_token_id)], 1)
    tiles = anyres.num_tiles(size, model.cfg.processing.pinpoints(30), 30)
    return dict(input_ids=ids, pixel_values=torch.randn(1, tiles, 3, 30, 30), image_sizes=torch.tensor([size]))


def with_value(inputs, key, index, value):
    out = dict(inputs, **{key: inputs[key].clone()})
    out[key][index] = value
    return out


# -- model inputs: forward and generate --------------------------------------------------------------------

def _model_cases():
    """``(name, make inputs from the dense model, message regex)``."""
    return [
        ("nan pixel", lambda m: with_value(image_batch(m, [(60, 90), (30, 45)]), "pixel_values", (1, 0, 0, 0, 0),
                                           float("nan")), r"pixel_values holds NaN or infinite values \(image 1\)"),
        ("inf pixel", lambda m: with_value(ids_with_image(m), "pixel_values", (0, 2, 1, 3, 3), float("inf")),
         r"pixel_values holds NaN or infinite values \(image 0\)"),
        ("id above vocab", lambda m: with_value(dict(input_ids=torch.randint(0, 200, (2, 6))), "input_ids", (1, 2), 300),
         r"input_ids\[1\] holds id 300 \(position 2\) outside the vocabulary \(0\.\.255\)"),
        ("negative id", lambda m: with_value(dict(input_ids=torch.randint(0, 200, (2, 6))), "input_ids", (0, 4), -1),
         r"input_ids\[0\] holds id -1 \(position 4\) outside the vocabulary"),
        ("float ids", lambda m: dict(input_ids=torch.rand(1, 4)), r"input_ids must hold integer token ids"),
        ("ids as a list", lambda m: dict(input_ids=[[1, 2, 3]]), r"input_ids must be a torch\.Tensor, got list"),
        ("all-padding row", lambda m: dict(input_ids=torch.randint(0, 200, (2, 5)),
                                           attention_mask=torch.tensor([[1] * 5, [0] * 5])),
         r"attention_mask rows \[1\] are all padding"),
        ("image_sizes with zeros", lambda m: dict(ids_with_image(m), image_sizes=torch.tensor([[0, 0]])),
         r"image_sizes\[0\] is \[0, 0\]: image heights and widths must be positive"),
        ("pixel_values as a list", lambda m: dict(ids_with_image(m), pixel_values=[torch.randn(7, 3, 30, 30)]),
         r"pixel_values must be a torch\.Tensor, got list"),
        ("image_sizes as a list", lambda m: dict(ids_with_image(m), image_sizes=[[60, 90]]),
         r"image_sizes must be a torch\.Tensor, got list"),
        # Same total tokens, sizes swapped between the samples: each sample would read the other's features.
        ("swapped image_sizes", lambda m: (lambda b: dict(b, image_sizes=b["image_sizes"].flip(0)))(
            image_batch(m, [(60, 90), (90, 60)])),
         r"sample 0 of input_ids holds 185 image tokens but its images \(image 0\) produce 190 features"),
    ]


@pytest.mark.parametrize("make, message", [c[1:] for c in _model_cases()], ids=[c[0] for c in _model_cases()])
def test_bad_model_inputs_are_input_errors(dense, make, message):
    inputs = make(dense)
    with pytest.raises(InputError, match=message):
        dense(**inputs)


@pytest.mark.parametrize("make, message", [c[1:] for c in _model_cases()[:4]], ids=[c[0] for c in _model_cases()[:4]])
def test_generate_refuses_them_too(dense, make, message):
    # A NaN pixel used to give NaN logits and a silent run of token 0s.
    with pytest.raises(InputError, match=message):
        dense.generate(**make(dense), max_new_tokens=3)


def test_swapped_image_sizes_ran_before_because_the_total_matches(dense):
    inputs = image_batch(dense, [(60, 90), (90, 60)])
    counts = (inputs["input_ids"] == 250).sum(1).tolist()
    assert counts == [185, 190]  # same total either way round: only the per-sample check sees the swap
    dense(**inputs)  # the right order runs
    with pytest.raises(InputError, match=r"sample 1 of input_ids holds 1 image tokens but its images \(image 1\)"):
        check_media_per_sample([2, 1], [2, 2], "image")
    with pytest.raises(InputError, match=r"batch_num_images has 1 entries but 2 samples of input_ids contain image"):
        check_media_per_sample([5, 0, 3], [5, 3], "image", groups=[2])
    with pytest.raises(InputError, match=r"sample 2 .* holds 3 image tokens but its images \(image 1, 2\) produce 6"):
        check_media_per_sample([5, 0, 3], [5, 3, 3], "image", groups=[1, 2])
    check_media_per_sample([5, 0, 6], [5, 3, 3], "image", groups=[1, 2])


def test_nan_embedding_table_and_nan_weights(dense):
    broken = copy.deepcopy(dense)
    with torch.no_grad():
        broken.decoder.embed_tokens.weight[7] = float("nan")
    ids = torch.tensor([[1, 2, 3], [4, 5, 7]])
    with pytest.raises(InputError, match="input embeddings of sample 1 .* token embedding table"):
        broken(ids)
    inside = copy.deepcopy(dense)
    with torch.no_grad():
        inside.decoder.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    # Finite inputs, NaN inside the model: generate stops with a clear error instead of emitting 0s.
    for sampling in (False, True):
        with pytest.raises(FloatingPointError, match=r"logits of samples \[0, 1\] are NaN or infinite at new token 0"):
            inside.generate(ids, max_new_tokens=4, do_sample=sampling)


def test_sequence_past_max_positions_warns_once(dense):
    model = copy.deepcopy(dense)
    model.cfg = copy.deepcopy(model.cfg)
    model.cfg.decoder.max_position_embeddings = 16
    with pytest.warns(UserWarning, match=r"input_ids reach position 19 .* max_position_embeddings=16"):
        model(torch.randint(0, 200, (1, 20)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randint(0, 200, (1, 20)))  # once per model
        dense(torch.randint(0, 200, (1, 20)))  # within the limit: silent


def test_qwen2_vl_grids_and_pixels(qwen):
    proc = Qwen2VLProcessor(qwen.cfg)
    rng = np.random.default_rng(1)
    vision = proc(images=[rng.integers(0, 256, (24, 36, 3), dtype=np.uint8), rng.integers(0, 256, (36, 24, 3),
                                                                                          dtype=np.uint8)])
    n = [proc._tokens_of(g) for g in vision["image_grid_thw"].tolist()]
    ids = torch.cat([torch.full((1, n[0] + n[1]), qwen.cfg.tokens.image_token_id), torch.randint(0, 200, (1, 3))], 1)
    qwen(ids, **vision)
    bad = vision["pixel_values"].clone()
    bad[vision["image_grid_thw"][0].prod() + 2, 5] = float("nan")
    with pytest.raises(InputError, match=r"pixel_values holds NaN .* \(patch \d+ of image 1\)"):
        qwen(ids, pixel_values=bad, image_grid_thw=vision["image_grid_thw"])
    zero = vision["image_grid_thw"].clone()
    zero[1, 1] = 0
    with pytest.raises(InputError, match=r"image_grid_thw\[1\] is \[1, 0, \d+\]"):
        qwen(ids, pixel_values=vision["pixel_values"], image_grid_thw=zero)
    with pytest.raises(InputError, match=r"image_grid_thw must be a torch\.Tensor, got list"):
        qwen(ids, pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"].tolist())


# -- sa_layers: one validation for forward, generate and flops ---------------------------------------------

@pytest.mark.parametrize("sa_layers, message", [
    ([1.9, 4.2], r"sa_layers=\[1\.9, 4\.2\]: layers must be ints, got \[1\.9, 4\.2\]"),
    ([True, 4], r"sa_layers=\[True, 4\]: layers must be ints, got \[True\]"),
    ([1, 1, 4], r"sa_layers=\[1, 1, 4\]: layers \[1\] are repeated"),
    (4, r"sa_layers=4 is a bare number; pass a list of layers such as \[4\]"),
    ("1,4", r"sa_layers must be None, 'all', 'router' or lists of layers, got '1,4'"),
    ([[1], 4], r"mixes lists and layers"),
    ([[1], [1, 1]], r"sa_layers\[1\]=\[1, 1\]: layers \[1\] are repeated"),
    (torch.tensor([1.0, 4.0]), r"layers must be ints"),
])
def test_bad_sa_layers(visor, sa_layers, message):
    inputs = batch(visor, [sample(visor), sample(visor, size=(30, 30), seed=1)])
    for call in (lambda: visor(**inputs, sa_layers=sa_layers),
                 lambda: visor.generate(**inputs, sa_layers=sa_layers, max_new_tokens=2)):
        with pytest.raises(InputError, match=message) as caught:
            call()
        assert isinstance(caught.value, ConfigError)  # the same error a card's bad configuration gives


def test_sa_layers_accepted_forms(visor):
    plan = visor.plan
    assert validate_sa_layers(plan, [4, 1], 2) == [[1, 4], [1, 4]]
    assert validate_sa_layers(plan, (np.int64(1), 2), 1) == [[1, 2]]
    assert validate_sa_layers(plan, torch.tensor([[1], [1]]), 2) == [[1], [1]]
    assert validate_sa_layers(plan, None, 1) == [plan.default]
    assert validate_sa_layers(plan, "router", 1, has_router=True) is None


# -- the untrained router ----------------------------------------------------------------------------------

def test_untrained_router_warns_once(visor):
    model = copy.deepcopy(visor)
    inputs = batch(model, [sample(model)])
    assert model.router.is_untrained()
    with pytest.warns(UserWarning, match="router that was never trained"):
        model(**inputs, sa_layers="router")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**inputs, sa_layers="router")  # once
        model.generate(**inputs, sa_layers="router", max_new_tokens=2)
    trained = copy.deepcopy(visor)
    with torch.no_grad():
        trained.router.mlp[2].bias.add_(0.01)  # what any optimiser step does
    assert not trained.router.is_untrained()
    # Its state survives a save/load round trip: the weights themselves tell.
    reloaded = copy.deepcopy(visor)
    reloaded.load_state_dict(trained.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reloaded(**inputs, sa_layers="router")
        visor(**inputs, sa_layers=[1, 2])  # fixed configurations never ask


# -- images: PIL modes, arrays, tensors (the processors) ---------------------------------------------------

def test_16bit_pil_image_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535], [1000, 2570, 12850, 65278]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = to_chw_tensor(image)
    expected = np.round(values / 257).astype(np.uint8)  # 255 / 65535 = 1 / 257
    assert out.dtype == torch.uint8 and out.shape == (3, 2, 4)
    assert torch.equal(out, torch.from_numpy(expected)[None].expand(3, -1, -1))
    assert expected.tolist() == [[0, 1, 128, 255], [4, 10, 50, 254]]
    # PIL itself would clip: everything above 255 turns white.
    assert np.array(image.convert("L")).tolist()[0] == [0, 255, 255, 255]
    # Big-endian 16-bit, a 32-bit "I" image and a uint16 array of the same data agree.
    assert torch.equal(to_chw_tensor(Image.fromarray(values.astype(np.int32))), out)
    assert torch.equal(to_chw_tensor(values), out)
    assert torch.equal(to_chw_tensor(torch.from_numpy(values.astype(np.int32))), out)


def test_8bit_data_in_a_16bit_container_reads_as_is():
    values = np.array([[0, 17, 255]], dtype=np.uint16)
    assert to_chw_tensor(Image.fromarray(values))[0].tolist() == [[0, 17, 255]]


def test_float_pil_image_on_the_0_255_scale():
    values = np.array([[0.0, 12.5, 255.0]], dtype=np.float32)
    out = to_chw_tensor(Image.fromarray(values))
    assert out.dtype == torch.float32 and out[0].tolist() == [[0.0, 12.5, 255.0]]


def _image_cases():
    hwc = np.random.default_rng(2).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    nan = hwc.astype(np.float32)
    nan[3, 4, 1] = np.nan
    return [
        ("float array with NaN", nan, r"image 1 holds NaN or infinite values"),
        ("float array with inf", np.full((12, 16, 3), np.inf, np.float32), r"image 1 holds NaN or infinite"),
        ("float array at 1e6", hwc.astype(np.float32) * 1e4, r"image 1 is floating point with values in \[\d+, 2\.55e\+06\]"),
        ("normalised floats", hwc.astype(np.float32) / 127.5 - 1, r"image 1 is floating point with values in \[-0\.99"),
        ("PIL F with NaN", Image.fromarray(np.ascontiguousarray(nan[..., 1])), r"image 1 holds NaN or infinite values"),
        ("PIL F at 1e6", Image.fromarray(np.full((4, 4), 1e6, np.float32)), r"image 1 is floating point"),
        ("PIL I above 16 bits", Image.fromarray(np.full((4, 4), 70000, np.int32)),
         r"image 1 \(torch\.int32\) holds values in \[70000, 70000\]; integer images must lie in 0\.\.255"),
        ("negative ints", -hwc.astype(np.int16) - 1, r"image 1 \(torch\.int16\) holds values in \[-256, -\d+\]"),
        ("bool array", hwc > 128, r"image 1 has unsupported dtype bool"),
        ("int32 tensor above 16 bits", torch.full((3, 4, 4), 2**20, dtype=torch.int32),
         r"image 1 .* holds values in \[1048576, 1048576\]"),
    ]


@pytest.mark.parametrize("image, message", [c[1:] for c in _image_cases()], ids=[c[0] for c in _image_cases()])
def test_bad_images_are_input_errors(image, message):
    cfg = visorlib.get_config("llava-ov-0.5b").tiny()
    ok = np.zeros((12, 16, 3), np.uint8)
    with pytest.raises(InputError, match=message):
        preprocess_images([ok, image], cfg)
    # The processors of both families go through the same check.
    with pytest.raises(InputError, match=message):
        LlavaOnevisionProcessor(cfg)(images=[ok, image])
    with pytest.raises(InputError, match=message):
        Qwen2VLProcessor(visorlib.get_config("qwen2-vl-2b").tiny())(images=[ok, image])


def test_bad_video_frame_names_the_frame():
    cfg = visorlib.get_config("llava-ov-0.5b").tiny()
    frames = [np.full((12, 16, 3), 100.0, np.float32) for _ in range(3)]
    frames[2][0, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"video frame 2 holds NaN"):
        LlavaOnevisionProcessor(cfg)(videos=frames)


def test_16bit_image_through_the_model(dense):
    # An I;16 photo is processed like its 8-bit version, not like a white page.
    rng = np.random.default_rng(5)
    eight = rng.integers(0, 256, (60, 90), dtype=np.uint8)
    proc = LlavaOnevisionProcessor(dense.cfg)
    wide = proc(images=Image.fromarray(eight.astype(np.uint16) * 257))
    assert torch.equal(wide["pixel_values"], proc(images=Image.fromarray(eight))["pixel_values"])
