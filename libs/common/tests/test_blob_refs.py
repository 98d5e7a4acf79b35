"""Input images the gateway stored apart: the reference's one form, and that an app cannot
send one (taskspec.blob_ref, parse_blob_ref, decode_data_url)."""

import base64
import hashlib
import io

import pytest
from PIL import Image

from stipple_common.errors import InvalidInput
from stipple_common.taskspec import (
    MAX_IMAGE_BYTES,
    MAX_INPUT_SIDE,
    blob_key,
    blob_ref,
    check_image_bytes,
    image_media_type,
    input_images,
    is_blob_ref,
    parse_blob_ref,
    parse_task,
    with_input_images,
)

DIGEST = hashlib.sha256(b"an image").hexdigest()


def png(width: int = 8, height: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_a_reference_is_the_prefix_and_a_sha256_hex_digest_and_keys_the_store_by_it():
    ref = blob_ref(DIGEST)
    assert ref == f"blob:sha256:{DIGEST}"
    assert is_blob_ref(ref)
    assert parse_blob_ref("init_image", ref) == DIGEST
    assert blob_key(DIGEST) == f"inputs/{DIGEST}"
    with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
        blob_ref(DIGEST.upper())


@pytest.mark.parametrize(
    "value",
    [
        f"blob:sha256:{DIGEST.upper()}",  # upper case
        f"blob:sha256:{DIGEST[:-1]}",  # 63 digits
        f"blob:sha256:{DIGEST}0",  # 65 digits
        f" blob:sha256:{DIGEST}",  # spaces
        f"blob:sha256:{DIGEST}\n",
        f"blob:sha1:{hashlib.sha1(b'x').hexdigest()}",  # another algorithm
        f"blob:sha256:{'g' * 64}",  # not hex
        f"blob:sha256:../{DIGEST[3:]}",  # a path
        "blob:",
        f"blob:SHA256:{DIGEST}",
    ],
)
def test_anything_but_the_exact_form_is_not_a_reference_and_the_error_names_the_field(value):
    with pytest.raises(InvalidInput) as refused:
        parse_blob_ref("mask_image", value)
    assert refused.value.field == "mask_image"
    assert refused.value.value == value


@pytest.mark.parametrize(
    ("task", "field"),
    [
        ({"kind": "img2img", "init_image": blob_ref(DIGEST)}, "init_image"),
        ({"kind": "img2img", "init_image": f"blob:sha256:{DIGEST.upper()}"}, "init_image"),
        ({"kind": "inpaint", "init_image": data_url(png()), "mask_image": blob_ref(DIGEST)}, "mask_image"),
        ({"controlnet": {"model": "cn", "image_dataurl": blob_ref(DIGEST)}}, "controlnet.image_dataurl"),
    ],
)
def test_an_app_cannot_send_a_reference_and_the_error_names_the_field(task, field):
    with pytest.raises(InvalidInput) as refused:
        parse_task({"base_model": "tiny-sd", "prompt": "x", **task})
    assert refused.value.field == field
    assert "blob references are written by the gateway" in refused.value.reason


def test_input_images_are_read_and_replaced_by_field():
    image = data_url(png())
    spec = parse_task(
        {
            "base_model": "tiny-sd",
            "prompt": "x",
            "kind": "inpaint",
            "init_image": image,
            "mask_image": image,
            "controlnet": {"model": "cn", "image_dataurl": image, "weight": 50},
        }
    )
    assert input_images(spec) == {"init_image": image, "mask_image": image, "controlnet.image_dataurl": image}
    ref = blob_ref(DIGEST)
    replaced = with_input_images(spec, {"mask_image": ref, "controlnet.image_dataurl": ref})
    assert input_images(replaced) == {"init_image": image, "mask_image": ref, "controlnet.image_dataurl": ref}
    assert replaced.controlnet is not None
    assert replaced.controlnet.weight == 0.5  # the rest as it was
    assert input_images(parse_task({"base_model": "tiny-sd", "prompt": "x"})) == {}


def test_fetched_bytes_get_the_data_urls_checks_and_name_the_field():
    data = png(16, 16)
    assert check_image_bytes("init_image", data) == data
    assert image_media_type(data) == "image/png"
    with pytest.raises(InvalidInput) as not_image:
        check_image_bytes("init_image", b"GIF89a" + bytes(100))
    assert not_image.value.field == "init_image"
    with pytest.raises(InvalidInput) as too_wide:
        check_image_bytes("mask_image", png(MAX_INPUT_SIDE + 8, 8))
    assert too_wide.value.field == "mask_image"
    assert too_wide.value.value == f"{MAX_INPUT_SIDE + 8}x8"
    with pytest.raises(InvalidInput) as too_big:
        check_image_bytes("controlnet.image_dataurl", data + bytes(MAX_IMAGE_BYTES))
    assert too_big.value.field == "controlnet.image_dataurl"
