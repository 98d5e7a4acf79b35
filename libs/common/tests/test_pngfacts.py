"""The facts the blob intake records of a node's PNG, and how they are judged against a
reveal: every outcome, the decode bound, and facts this code cannot read."""

import hashlib
import io
import random

import pytest
from PIL import Image

from stipple_common.phash import image_phash
from stipple_common.pngfacts import VERSION, PngFacts, judge, png_facts


def png(seed: int = 0, width: int = 64, height: int = 64) -> bytes:
    image = Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_the_facts_of_a_png_are_its_hash_size_and_the_nodes_phash():
    data = png(1, 72, 64)
    facts = png_facts(data, max_pixels=10_000)
    with Image.open(io.BytesIO(data)) as image:
        assert facts == PngFacts(hashlib.sha256(data).hexdigest(), 72, 64, image_phash(image))
    assert PngFacts.decode(facts.encode()) == facts


def test_what_is_no_png_and_what_is_too_big_to_decode():
    junk = png_facts(b"hello; not; an; image", max_pixels=10_000)
    assert (junk.width, junk.phash) == (0, "")
    assert "UnidentifiedImageError" in junk.error
    assert PngFacts.decode(junk.encode()) == junk  # an error with ';' in it survives the line
    big = png_facts(png(2, 128, 128), max_pixels=100 * 100)
    assert (big.width, big.height, big.phash, big.error) == (128, 128, "", "128x128 is over 10000 pixels")


@pytest.mark.parametrize(
    "text",
    [None, "", "2;" + "a" * 64 + ";64;64;ffff;", "1;short;64;64;ffff;", "1;" + "a" * 64 + ";x;64;ffff;", "1;a;b"],
)
def test_facts_this_code_cannot_read_are_none(text):
    """(Another version, or anything malformed: the validator then reads the bytes.)"""
    assert PngFacts.decode(text) is None


def test_an_error_is_one_line_of_ascii():
    facts = PngFacts("a" * 64, error="bad\nbyte: \u00e9")
    line = facts.encode()
    assert line.isascii()
    assert "\n" not in line
    assert line.startswith(f"{VERSION};")


def test_judge_in_the_order_the_checks_run_on_the_bytes():
    data = png(3)
    facts = png_facts(data, max_pixels=64 * 64)
    sha, phash = facts.sha256, facts.phash
    assert judge(facts, sha, 64, 64, phash) == ("ok", "")
    assert judge(facts, "b" * 64, 64, 64, phash)[0] == "sha256_mismatch"
    assert judge(facts, sha, 64, 72, phash) == ("size_mismatch", "the PNG is 64x64, not 64x72")
    assert judge(facts, sha, 64, 64, "0" * 16)[0] == "phash_mismatch"
    unreadable = PngFacts(sha, error="OSError: truncated")
    assert judge(unreadable, sha, 64, 64, phash) == ("not_png", "not a decodable PNG: OSError: truncated")
    too_big = PngFacts(sha, 9000, 9000, error="9000x9000 is over 4194304 pixels")
    assert judge(too_big, sha, 64, 64, phash)[0] == "size_mismatch"  # as the bytes' header says
