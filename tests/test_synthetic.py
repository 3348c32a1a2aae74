import numpy as np

from pipeline.data.synthetic import generate


def make(seed: int = 0, **overrides):
    settings = dict(items=6, images_per_item=4, width=48, height=64, defect_ratio=0.25, defect_contrast=1.0)
    settings.update(overrides)
    return list(generate(seed=seed, **settings))


def test_counts_sizes_and_groups():
    images = make()
    assert len(images) == 24
    assert sum(i.label for i in images) == 6
    assert {i.group for i in images} == {f"item{k:03d}" for k in range(6)}
    assert all(i.image.shape == (64, 48) and i.image.dtype == np.uint8 for i in images)
    assert len({i.id for i in images}) == 24


def test_masks_mark_exactly_the_defective_images():
    for image in make():
        assert image.mask.shape == image.image.shape
        assert image.mask.any() == bool(image.label)
        if image.label:
            assert image.kind in ("scratch", "crack", "pit")
            # Small and thin: a defect covers a tiny part of the surface.
            assert image.mask.mean() < 0.05


def test_same_seed_same_images_other_seed_other_images():
    first, again, other = make(0), make(0), make(1)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(first, other))


def test_defects_change_the_pixels_under_their_mask():
    plain = make(defect_contrast=1e-6)
    strong = make(defect_contrast=1.0)
    for a, b in zip(plain, strong):
        if b.label:
            assert np.abs(b.image[b.mask].astype(int) - a.image[a.mask].astype(int)).mean() > 10


def test_defects_are_sized_like_real_ones_at_the_prepared_size():
    """Several pixels of defect at 128x128 (pits a few pixels across, grooves long), so that a
    saliency map at stride 8 or 16 has something to find; still a small part of the surface."""
    images = [i for i in make(items=40, width=128, height=128) if i.label]
    assert {i.kind for i in images} == {"scratch", "crack", "pit"}
    for image in images:
        rows, cols = np.nonzero(image.mask)
        extent = max(np.ptp(rows), np.ptp(cols)) + 1
        assert extent >= (4 if image.kind == "pit" else 20), (image.id, image.kind, extent)
        assert 9 <= image.mask.sum() <= 0.02 * image.mask.size
