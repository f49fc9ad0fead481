"""Tests for query_sdk.spec: InputSpec validation and serialisation, to_model_input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from query_sdk.spec import InputSpec, to_model_input

# ----------------------------------------------------------------------------- InputSpec


@pytest.mark.parametrize("channels", [0, 2, 4, -1])
def test_bad_channels_rejected(channels):
    with pytest.raises(ValueError, match=f"channels must be 1 or 3, got {channels}"):
        InputSpec(28, 28, channels)


@pytest.mark.parametrize(("height", "width"), [(0, 28), (28, 0), (-3, 5)])
def test_non_positive_size_rejected(height, width):
    with pytest.raises(ValueError, match="height and width must be positive"):
        InputSpec(height, width, 1)


@pytest.mark.parametrize(
    ("channels", "mean", "needs", "got"),
    [(1, (0.1, 0.2), 1, 2), (3, (0.1, 0.2), 3, 2), (3, (0.1, 0.2, 0.3, 0.4), 3, 4)],
)
def test_bad_mean_length_rejected(channels, mean, needs, got):
    with pytest.raises(ValueError, match=f"mean needs 1 or {needs} values, got {got}"):
        InputSpec(8, 8, channels, mean=mean)


def test_bad_std_length_rejected():
    with pytest.raises(ValueError, match="std needs 1 or 3 values, got 2"):
        InputSpec(8, 8, 3, std=(0.5, 0.5))


@pytest.mark.parametrize("std", [(0.0,), (-0.1,), (0.5, 0.0, 0.5), (0.5, 0.5, -1.0)])
def test_non_positive_std_rejected(std):
    with pytest.raises(ValueError, match="std must be positive"):
        InputSpec(8, 8, 3, std=std)


@pytest.mark.parametrize(("dtype", "layout"), [("float32", "NHWC"), ("uint8", "NCHW")])
def test_only_uint8_nhwc(dtype, layout):
    with pytest.raises(ValueError, match="only uint8 NHWC"):
        InputSpec(8, 8, 1, dtype=dtype, layout=layout)


def test_single_mean_and_std_are_broadcast_to_channels():
    spec = InputSpec(8, 6, 3, mean=(0.25,), std=(2,))
    assert spec.mean == (0.25, 0.25, 0.25)
    assert spec.std == (2.0, 2.0, 2.0)
    assert all(isinstance(v, float) for v in spec.std)
    assert spec.shape == (8, 6, 3)


def test_to_dict_values():
    spec = InputSpec(32, 24, 3, mean=(0.1, 0.2, 0.3), std=(0.5,))
    assert spec.to_dict() == {
        "height": 32,
        "width": 24,
        "channels": 3,
        "mean": [0.1, 0.2, 0.3],
        "std": [0.5, 0.5, 0.5],
        "dtype": "uint8",
        "layout": "NHWC",
    }


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(28, 28, 1, mean=(0.286,), std=(0.353,)),
        InputSpec(32, 24, 3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7)),
    ],
)
def test_dict_round_trip_through_json(spec):
    d = json.loads(json.dumps(spec.to_dict()))
    back = InputSpec.from_dict(d)
    assert back == spec
    assert back.mean == spec.mean and back.std == spec.std
    assert hash(back) == hash(spec)


def test_from_dict_accepts_lists_and_partial_dicts():
    spec = InputSpec.from_dict({"height": 5, "width": 7, "channels": 3, "mean": [0.0, 0.5, 1.0]})
    assert spec == InputSpec(5, 7, 3, mean=(0.0, 0.5, 1.0), std=(0.5, 0.5, 0.5))


def test_from_dict_unknown_keys():
    d = {**InputSpec(8, 8, 1).to_dict(), "extra": 1, "colour": "red"}
    with pytest.raises(ValueError, match=r"unknown input spec keys \['colour', 'extra'\]"):
        InputSpec.from_dict(d)


def test_from_dict_validates_values():
    d = {**InputSpec(8, 8, 1).to_dict(), "std": [0.0]}
    with pytest.raises(ValueError, match="std must be positive"):
        InputSpec.from_dict(d)


# ----------------------------------------------------------------------------- to_model_input


def test_matching_grey_input_is_unchanged_and_gets_a_channel_axis():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = to_model_input(images, InputSpec(3, 4, 1))
    assert out.shape == (2, 3, 4, 1)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], images)


def test_grey_to_rgb_repeats_values():
    grey = np.array([[[0, 128], [255, 7]]], dtype=np.uint8)  # (1, 2, 2)
    out = to_model_input(grey, InputSpec(2, 2, 3))
    assert out.shape == (1, 2, 2, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)
    # (N, H, W, 1) input behaves the same as (N, H, W)
    np.testing.assert_array_equal(to_model_input(grey[..., None], InputSpec(2, 2, 3)), out)


def test_rgb_to_grey_uses_itu_601_luma():
    rgb = np.array(
        [
            [[255, 0, 0], [0, 255, 0], [0, 0, 255]],
            [[100, 150, 200], [10, 20, 30], [255, 255, 255]],
        ],
        dtype=np.uint8,
    )[None]  # (1, 2, 3, 3)
    out = to_model_input(rgb, InputSpec(2, 3, 1))
    # 0.299*255 = 76.245 -> 76;  0.587*255 = 149.685 -> 150;  0.114*255 = 29.07 -> 29
    # 0.299*100 + 0.587*150 + 0.114*200 = 29.9 + 88.05 + 22.8 = 140.75 -> 141
    # 0.299*10 + 0.587*20 + 0.114*30 = 2.99 + 11.74 + 3.42 = 18.15 -> 18
    # white stays 255 (no overflow to 0)
    expected = np.array([[[76, 150, 29], [141, 18, 255]]], dtype=np.uint8)
    assert out.shape == (1, 2, 3, 1)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], expected)


def test_rgb_to_grey_is_pillows_luma_on_every_colour():
    """Integer fixed point, so the native SDK's conversion matches it bit for bit on any CPU
    (a float32 matmul rounds differently across SIMD paths)."""
    from PIL import Image

    every = np.arange(2**24, dtype=np.uint32).view(np.uint8).reshape(4096, 4096, 4)[..., :3]
    out = to_model_input(every[None], InputSpec(4096, 4096, 1))[0, ..., 0]
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(every).convert("L")))


def test_rgba_drops_alpha():
    rgb = np.array([[[[100, 150, 200], [1, 2, 3]]]], dtype=np.uint8)  # (1, 1, 2, 3)
    opaque = np.concatenate([rgb, np.full((1, 1, 2, 1), 255, np.uint8)], axis=-1)
    clear = np.concatenate([rgb, np.zeros((1, 1, 2, 1), np.uint8)], axis=-1)
    for rgba in (opaque, clear):
        out = to_model_input(rgba, InputSpec(1, 2, 3))
        assert out.shape == (1, 1, 2, 3)
        np.testing.assert_array_equal(out, rgb)
        grey = to_model_input(rgba, InputSpec(1, 2, 1))
        # 140.75 -> 141; 0.299 + 1.174 + 0.342 = 1.815 -> 2
        np.testing.assert_array_equal(grey[0, 0, :, 0], [141, 2])


def test_resize_grey_to_spec_size():
    images = np.full((2, 10, 12), 77, dtype=np.uint8)
    out = to_model_input(images, InputSpec(28, 28, 1))
    assert out.shape == (2, 28, 28, 1)
    assert out.dtype == np.uint8
    assert (out == 77).all()  # bilinear resize keeps a constant image constant


def test_resize_keeps_height_and_width_apart():
    images = np.zeros((3, 4, 4), dtype=np.uint8)
    out = to_model_input(images, InputSpec(6, 10, 1))
    assert out.shape == (3, 6, 10, 1)


def test_resize_rgb_and_convert_together():
    colour = np.array([10, 200, 30], np.uint8)
    images = np.broadcast_to(colour, (1, 5, 7, 3)).copy()
    rgb = to_model_input(images, InputSpec(9, 4, 3))
    assert rgb.shape == (1, 9, 4, 3)
    assert (rgb == colour).all()
    grey = to_model_input(images, InputSpec(9, 4, 1))
    # 0.299*10 + 0.587*200 + 0.114*30 = 2.99 + 117.4 + 3.42 = 123.81 -> 124
    assert grey.shape == (1, 9, 4, 1)
    assert (grey == 124).all()


def test_resize_left_half_dark_right_half_bright():
    images = np.zeros((1, 4, 4), dtype=np.uint8)
    images[:, :, 2:] = 200
    out = to_model_input(images, InputSpec(8, 8, 1))[0, :, :, 0]
    assert (out[:, 0] == 0).all()
    assert (out[:, -1] == 200).all()
    assert (np.diff(out.astype(int), axis=1) >= 0).all()  # monotone left to right


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint16])
def test_non_uint8_rejected(dtype):
    with pytest.raises(ValueError, match="images must be uint8"):
        to_model_input(np.zeros((1, 4, 4, 1), dtype=dtype), InputSpec(4, 4, 1))


@pytest.mark.parametrize("shape", [(4, 4), (1, 4, 4, 2), (1, 4, 4, 5), (1, 1, 4, 4, 1)])
def test_bad_image_shape_rejected(shape):
    with pytest.raises(ValueError, match=r"images must be \(N, H, W\[, C\]\)"):
        to_model_input(np.zeros(shape, dtype=np.uint8), InputSpec(4, 4, 1))
