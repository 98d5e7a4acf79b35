"""Small real PNGs for the validator's tests, made the way a node makes them (RGB, no
text chunks), with the hashes a node reveals for them: the `pictures` fixture."""

from __future__ import annotations

import hashlib
import io
import random

import pytest
from PIL import Image

from stipple_common.phash import image_phash


class Pictures:
    @staticmethod
    def image(seed: int, width: int = 64, height: int = 64) -> Image.Image:
        """Noise from `seed`: different seeds give pHashes far apart (about 32 bits)."""
        return Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))

    @staticmethod
    def png(seed: int, width: int = 64, height: int = 64) -> bytes:
        buffer = io.BytesIO()
        Pictures.image(seed, width, height).save(buffer, format="PNG", optimize=False, compress_level=6)
        return buffer.getvalue()

    @staticmethod
    def hashes(png: bytes) -> tuple[str, str]:
        """(pHash, SHA-256) of a PNG, as a node reveals them."""
        with Image.open(io.BytesIO(png)) as image:
            return image_phash(image), hashlib.sha256(png).hexdigest()


@pytest.fixture
def pictures() -> type[Pictures]:
    return Pictures
