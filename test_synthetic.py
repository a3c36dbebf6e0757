"""Tests of the synthetic street scenes: a pure function of (split seed, index), unchanged since
the generator moved out of data.py (checksums computed on the code before the move)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import ndimage

import data
import synthetic

# (scene seed, index, (H, W)) -> (sha256 of the label and instance maps, first 16 hex digits;
# per-channel sums of the image). Computed on the generator as it was inside data.py
# (commit 484cb64), where the full sha256 of image + maps also matched after the move.
SCENE_CHECKSUMS = [
    (data.SYNTHETIC_SPLIT_SEEDS["train"], 0, (128, 128), "47424314965cc2ab", (1348098, 2449594, 2260874)),
    (data.SYNTHETIC_SPLIT_SEEDS["train"], 37, (128, 128), "11119692cb8e5eff", (2492958, 1942856, 2745013)),
    (data.SYNTHETIC_SPLIT_SEEDS["val"], 0, (128, 128), "bfdf6d4ccb7e7dbe", (2012115, 1553690, 2340461)),
    (data.SYNTHETIC_SPLIT_SEEDS["val"], 1, (128, 128), "124d7e34f7310472", (2352606, 1717537, 2191577)),
    (data.SYNTHETIC_SPLIT_SEEDS["test"], 37, (128, 128), "621feb9b4604710a", (1728027, 1697920, 1662880)),
    (5, 3, (72, 96), "42002d9e48b5b928", (919344, 496361, 916311)),
]


@pytest.mark.parametrize("seed, index, size, maps_digest, channel_sums", SCENE_CHECKSUMS)
def test_scenes_match_their_checksums(seed, index, size, maps_digest, channel_sums) -> None:
    image, label, instance = synthetic.make_scene(seed, index, size)
    assert image.shape == size + (3,) and image.dtype == np.uint8
    assert label.dtype == np.uint8 == instance.dtype and label.shape == size == instance.shape
    # The maps come from geometry alone (float32 +, *, sqrt: the same on every machine): exact.
    assert hashlib.sha256(label.tobytes() + instance.tobytes()).hexdigest()[:16] == maps_digest
    # The image goes through a BLAS product (the lighting field) whose last-bit rounding may
    # differ between CPUs; a flipped rounding moves a channel sum by 1. Any change to the
    # drawing (an extra random draw, another colour) moves them by thousands.
    sums = image.reshape(-1, 3).sum(axis=0, dtype=np.int64)
    assert np.abs(sums - np.array(channel_sums)).max() <= 8, sums.tolist()


def test_synthetic_has_thin_structures_and_voc_style_instances() -> None:
    thin_classes = [synthetic.CLASSES.index(n) for n in ("pole", "person", "bicycle", "fence")]
    thin_total, class_total, pole_colours = 0, 0, []
    for i in range(12):
        image, label, instance = synthetic.make_scene(data.SYNTHETIC_SPLIT_SEEDS["val"], i)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert label.max() < len(synthetic.CLASSES)
        scene_thin = 0
        for c in thin_classes:
            mask = label == c
            # Pixels that a 4x4 opening removes belong to parts at most 3 px wide.
            thin = mask & ~ndimage.binary_opening(mask, structure=np.ones((4, 4), bool))
            scene_thin += int(thin.sum())
            class_total += int(mask.sum())
        assert scene_thin >= 50, f"scene {i} has only {scene_thin} thin-structure pixels"
        thin_total += scene_thin
        # VOC convention: every id other than 255 is one instance of a single class.
        ids = np.unique(instance)
        assert 255 not in ids and len(ids) >= 4
        for k in ids:
            assert len(np.unique(label[instance == k])) == 1
        pole_colours.append(image[label == thin_classes[0]].mean(0))
    assert thin_total / class_total > 0.5
    # Appearance is a weak cue: the mean colour of the poles changes a lot from scene to scene.
    assert np.std(pole_colours, axis=0).min() > 15
