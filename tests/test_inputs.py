"""Bad model inputs fail with an error that names the problem."""

from __future__ import annotations

import pytest
import torch

import visorlib
from visorlib.models import InputError
from visorlib.processing import anyres


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return visorlib.zoo.instantiate(visorlib.get_config("llava-ov-0.5b").tiny()).eval()


def ids_with_images(model, n_tokens):
    return torch.cat([torch.randint(0, 200, (1, 2)), torch.full((1, n_tokens), model.cfg.tokens.image_token_id)], 1)


def expected_tokens(model, size):
    cfg = model.cfg
    return anyres.num_image_tokens(size, cfg.processing.pinpoints(30), 30, cfg.vision.grid_size, cfg.processing.max_tiles)


def test_image_token_count_must_match_features(model):
    n = expected_tokens(model, (60, 90))
    with pytest.raises(InputError, match=rf"{n - 1} image tokens but the images produce {n} features"):
        model(ids_with_images(model, n - 1), pixel_values=torch.randn(1, 7, 3, 30, 30), image_sizes=torch.tensor([[60, 90]]))


def test_image_tokens_without_pixels(model):
    with pytest.raises(InputError, match="5 image tokens but no image pixels"):
        model(ids_with_images(model, 5))


def test_pixel_values_shape(model):
    with pytest.raises(InputError, match=r"pixel_values must be \[images, tiles, 3, 30, 30\], got \[7, 3, 30, 30\]"):
        model(ids_with_images(model, 5), pixel_values=torch.randn(7, 3, 30, 30), image_sizes=torch.tensor([[60, 90]]))
    with pytest.raises(InputError, match="image 0 of size .* needs 7 tiles but pixel_values holds 2"):
        model(ids_with_images(model, 5), pixel_values=torch.randn(1, 2, 3, 30, 30), image_sizes=torch.tensor([[60, 90]]))


def test_image_sizes_shape(model):
    with pytest.raises(InputError, match=r"image_sizes must be \[1, 2\]"):
        model(ids_with_images(model, 5), pixel_values=torch.randn(1, 7, 3, 30, 30), image_sizes=torch.tensor([60, 90]))


def test_batch_num_images_must_cover_the_images(model):
    with pytest.raises(InputError, match="batch_num_images sums to 3 but image_sizes describes 2 images"):
        model(ids_with_images(model, 5), pixel_values=torch.randn(2, 7, 3, 30, 30),
              image_sizes=torch.tensor([[60, 90], [30, 30]]), batch_num_images=torch.tensor([3]))


def test_input_ids_and_mask_shapes(model):
    with pytest.raises(InputError, match=r"input_ids must be \[batch, length\]"):
        model(torch.randint(0, 200, (7,)))
    with pytest.raises(InputError, match=r"attention_mask must be \[1, 7\]"):
        model(torch.randint(0, 200, (1, 7)), attention_mask=torch.ones(1, 6, dtype=torch.long))


def test_video_shape(model):
    with pytest.raises(InputError, match="pixel_values_videos must be"):
        model(torch.full((1, 4), model.cfg.tokens.video_token_id), pixel_values_videos=torch.randn(4, 3, 30, 30))


def test_dense_model_rejects_visor_configurations(model):
    with pytest.raises(ValueError, match="dense model with no VISOR layer plan"):
        model(torch.randint(0, 200, (1, 4)), sa_layers=[1, 4])
