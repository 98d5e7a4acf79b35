"""The locally built tiny SD 1.5 model: loadable by diffusers, idempotent, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stipple_common.errors import StippleError
from stipple_node.tinymodel import TINY_MODEL_NAME, build_clip_vocab, make_tiny_model


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_name() -> None:
    assert TINY_MODEL_NAME == "tiny-sd"


def test_folder_loads_as_a_stable_diffusion_pipeline(tiny_model_dir: Path) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor == 8  # SD's 8x latent downsampling
    assert "CrossAttnDownBlock2D" in pipe.unet.config.down_block_types
    assert "CrossAttnUpBlock2D" in pipe.unet.config.up_block_types
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 77
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tiny_model_dir / "tokenizer").iterdir()}
    assert list(tiny_model_dir.rglob("*.safetensors"))
    assert not list(tiny_model_dir.rglob("*.bin"))


def test_second_call_is_a_no_op(tiny_model_dir: Path) -> None:
    before = _mtimes(tiny_model_dir)
    assert make_tiny_model(tiny_model_dir) == tiny_model_dir
    assert _mtimes(tiny_model_dir) == before
    assert not [p for p in tiny_model_dir.parent.iterdir() if ".building-" in p.name]  # no staging left behind


def test_same_seed_gives_identical_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes()


def test_refuses_a_non_empty_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "other.txt").write_text("not a model")
    with pytest.raises(StippleError, match="not an empty folder"):
        make_tiny_model(tmp_path)
    assert [p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.building-")] == []


def test_tokenizer_round_trips_a_prompt(tiny_model_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    prompt = "a beautiful portrait of a cat highly detailed golden hour"
    ids = tokenizer(prompt).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    # Common words are whole tokens, as in CLIP.
    assert tokenizer.convert_ids_to_tokens(tokenizer("cat portrait").input_ids[1:-1]) == ["cat</w>", "portrait</w>"]
    # Unseen words and odd bytes still tokenize (byte-level: nothing is unknown).
    odd = tokenizer("zyxquv 42 ünïcødé 🐱").input_ids
    assert tokenizer.unk_token_id not in odd[1:-1]


def test_tokenizer_handles_a_long_prompt(tiny_model_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    long_prompt = ", ".join(["a very detailed painting of a castle on a mountain at sunset"] * 20)
    assert len(tokenizer(long_prompt).input_ids) > 200
    batch = tokenizer(long_prompt, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    assert tuple(batch.input_ids.shape) == (1, 77)
    assert int(batch.input_ids.max()) < len(tokenizer)


def test_vocab_files_are_consistent(tiny_model_dir: Path) -> None:
    folder = tiny_model_dir / "tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    merges = [tuple(line.split(" ")) for line in lines[1:]]
    assert len(merges) > 300
    for a, b in merges:  # transformers 5 requires both parts and the result in the vocab
        assert a in vocab
        assert b in vocab
        assert a + b in vocab
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    assert vocab["<|startoftext|>"] == len(vocab) - 2
    assert (vocab, [list(m) for m in merges]) == (build_clip_vocab()[0], [list(m) for m in build_clip_vocab()[1]])
