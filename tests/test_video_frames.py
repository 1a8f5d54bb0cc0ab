"""Evaluation video frames: the render view with the policy's camera images beside it."""

import numpy as np

from flowmanip.envs.vector import with_camera_view


def test_camera_images_sit_right_of_the_render_view_scaled_by_nearest_neighbour():
    rng = np.random.default_rng(0)
    view = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    rgb = rng.integers(0, 256, (2, 2, 6), dtype=np.uint8)  # two 2x2 cameras stacked on C
    frame = with_camera_view(view, rgb)
    assert frame.shape == (8, 10 + 8 + 8, 3) and frame.dtype == np.uint8
    assert np.array_equal(frame[:, :10], view)
    for cam in range(2):
        for i in range(2):
            for j in range(2):  # each camera pixel becomes a 4x4 block
                block = frame[4 * i:4 * i + 4, 10 + 8 * cam + 4 * j:10 + 8 * cam + 4 * j + 4]
                assert (block == rgb[i, j, 3 * cam:3 * cam + 3]).all()


def test_state_policies_get_the_render_view_only():
    view = np.zeros((6, 6, 3), np.uint8)
    assert with_camera_view(view, None) is view
