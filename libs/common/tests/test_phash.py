import pytest

from stipple_common.phash import hamming, same_images


def test_hamming_counts_differing_bits():
    assert hamming("0000000000000000", "0000000000000000") == 0
    assert hamming("0000000000000000", "000000000000000f") == 4
    assert hamming("ffffffffffffffff", "0000000000000000") == 64


def test_hamming_rejects_different_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        hamming("00", "000")


def test_same_images_uses_threshold_per_image():
    a = ["0000000000000000", "ffffffffffffffff"]
    b = ["0000000000000007", "ffffffffffffffff"]  # 3 bits off in image 0
    assert same_images(a, b, threshold=3)
    assert not same_images(a, b, threshold=2)
    assert not same_images(a, a[:1], threshold=64)  # a different image count never agrees
