"""Which examples each step sees: permutations, shards, batches, random shifts."""
import numpy as np
import pytest

from lenet_dist.data import sampler


def test_epoch_permutation_is_deterministic_per_seed_and_epoch():
    a = sampler.epoch_permutation(5, 3, 1000)
    np.testing.assert_array_equal(a, sampler.epoch_permutation(5, 3, 1000))
    np.testing.assert_array_equal(np.sort(a), np.arange(1000))        # a permutation
    assert not np.array_equal(a, sampler.epoch_permutation(5, 4, 1000))  # another epoch
    assert not np.array_equal(a, sampler.epoch_permutation(6, 3, 1000))  # another seed
    assert not np.array_equal(a, np.arange(1000))


def test_epochs_are_all_different():
    perms = [sampler.epoch_permutation(0, e, 200) for e in range(20)]
    assert len({p.tobytes() for p in perms}) == 20
    # independent of what was drawn before (no hidden state): epoch 7 alone equals epoch 7 in sequence
    np.testing.assert_array_equal(sampler.epoch_permutation(0, 7, 200), perms[7])


def test_epoch_permutation_pinned_values():
    """The data order and the shifts are part of bit-for-bit reproducibility and of checkpoint resume: pinned
    as literal values, so a change of seeding, of generator or of NumPy's algorithm fails here (a saved run
    would otherwise resume on another order without a word)."""
    assert sampler.epoch_permutation(1, 2, 10).tolist() == [8, 5, 6, 0, 9, 1, 4, 3, 7, 2]
    assert sampler.epoch_permutation(0, 0, 12).tolist() == [9, 2, 7, 4, 5, 11, 0, 3, 6, 10, 8, 1]
    assert sampler.random_shifts(0, 0, 0, 6, 2).tolist() == [[2, 0], [-2, -1], [1, 0], [1, -1], [2, -2], [-2, -2]]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 10, 16, 17, 63, 64, 100, 1001])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8, 13])
def test_shard_bounds_partition(n, size):
    bounds = [sampler.shard_bounds(n, r, size) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (lo, hi), (lo2, _) in zip(bounds, bounds[1:]):
        assert hi == lo2                                        # contiguous, no gap, no overlap
    sizes = [hi - lo for lo, hi in bounds]
    assert all(s >= 0 for s in sizes) and sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)                 # lower ranks take the extra ones
    covered = np.zeros(n, int)
    for lo, hi in bounds:
        covered[lo:hi] += 1
    assert (covered == 1).all()
    if n < size:
        assert sizes.count(0) == size - n


def test_steps_and_global_batches_cover_the_epoch():
    n, bs = 103, 16
    perm = sampler.epoch_permutation(0, 0, n)
    steps = sampler.steps_per_epoch(n, bs)
    assert steps == 7
    batches = [sampler.global_batch(perm, s, bs) for s in range(steps)]
    assert [len(b) for b in batches] == [16] * 6 + [7]
    np.testing.assert_array_equal(np.concatenate(batches), perm)
    assert sampler.steps_per_epoch(96, 16) == 6 and sampler.steps_per_epoch(1, 16) == 1


def ref_shift(img, dy, dx):
    """np.roll, then zero what wrapped around: +dy moves content down, +dx moves it right."""
    out = np.roll(img, (dy, dx), axis=(0, 1))
    if dy > 0:
        out[:dy] = 0
    elif dy < 0:
        out[dy:] = 0
    if dx > 0:
        out[:, :dx] = 0
    elif dx < 0:
        out[:, dx:] = 0
    return out


@pytest.mark.parametrize("max_shift", [1, 2, 4])
def test_shift_images_matches_per_image_reference(max_shift):
    rng = np.random.default_rng([9, max_shift])
    images = rng.integers(1, 256, size=(40, 28, 28), dtype=np.uint8)   # no zeros: fill is visible
    shifts = sampler.random_shifts(3, 1, 2, 40, max_shift)
    out = sampler.shift_images(images, shifts, max_shift)
    assert out.shape == images.shape and out.dtype == np.uint8
    for i in range(40):
        np.testing.assert_array_equal(out[i], ref_shift(images[i], *shifts[i]), err_msg=f"image {i} {shifts[i]}")


def test_shift_images_every_offset():
    m = 2
    offsets = np.array([(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)])
    rng = np.random.default_rng(10)
    images = rng.integers(1, 256, size=(len(offsets), 28, 28), dtype=np.uint8)
    out = sampler.shift_images(images, offsets, m)
    for i, (dy, dx) in enumerate(offsets):
        np.testing.assert_array_equal(out[i], ref_shift(images[i], dy, dx))
        assert (out[i] == 0).sum() == 28 * 28 - (28 - abs(dy)) * (28 - abs(dx))


def test_zero_shift_is_identity():
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    for m in (0, 1, 3):
        np.testing.assert_array_equal(sampler.shift_images(images, np.zeros((5, 2), int), m), images)


def test_random_shifts_in_range_and_deterministic():
    for m in (1, 2, 4):
        s = sampler.random_shifts(0, 0, 0, 5000, m)
        assert s.shape == (5000, 2)
        assert s.min() == -m and s.max() == m                 # in range, and both ends are reached
        assert set(np.unique(s)) == set(range(-m, m + 1))
    np.testing.assert_array_equal(sampler.random_shifts(1, 2, 3, 50, 2), sampler.random_shifts(1, 2, 3, 50, 2))
    assert not np.array_equal(sampler.random_shifts(1, 2, 3, 50, 2), sampler.random_shifts(1, 2, 4, 50, 2))
    assert not np.array_equal(sampler.random_shifts(1, 2, 3, 50, 2), sampler.random_shifts(1, 3, 3, 50, 2))


def test_shift_of_a_batch_slice_matches_the_whole_batch():
    # ranks slice the global batch's shifts; each example must get the same shift whatever the slicing
    rng = np.random.default_rng(12)
    images = rng.integers(1, 256, size=(10, 28, 28), dtype=np.uint8)
    shifts = sampler.random_shifts(4, 0, 1, 10, 2)
    whole = sampler.shift_images(images, shifts, 2)
    np.testing.assert_array_equal(sampler.shift_images(images[3:7], shifts[3:7], 2), whole[3:7])


def test_shift_images_of_an_empty_shard_and_of_wider_dtypes():
    # a rank may get no examples of a batch; the reference gathers per image whatever the dtype
    out = sampler.shift_images(np.zeros((0, 28, 28), np.uint8), np.zeros((0, 2), int), 1)
    assert out.shape == (0, 28, 28) and out.dtype == np.uint8
    rng = np.random.default_rng(13)
    images = rng.integers(1, 256, size=(6, 9, 7)).astype(np.float32)
    shifts = sampler.random_shifts(5, 0, 0, 6, 2)
    out = sampler.shift_images(images, shifts, 2)
    assert out.dtype == np.float32
    for i in range(6):
        np.testing.assert_array_equal(out[i], ref_shift(images[i], *shifts[i]))
