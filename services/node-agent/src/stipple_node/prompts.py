"""Prompt embeddings through compel: prompts longer than 77 tokens and weighted prompts.

Weights use compel's syntax (``(red fox)1.3``, ``fox++``, ``fox--``); AUTOMATIC1111's
``(red fox:1.3)`` is rewritten into it. Textual-inversion tokens loaded into the pipeline
are expanded. An SDXL refiner (one text encoder) gets plain strings; diffusers truncates
them at 77 tokens.
"""

from __future__ import annotations

import re
from typing import Any

from compel import CompelForSD, CompelForSDXL, DiffusersTextualInversionManager

_A1111_WEIGHT = re.compile(r"\(([^():]+):\s*([0-9]*\.?[0-9]+)\)")


def a1111_to_compel(prompt: str) -> str:
    """``(a red fox:1.3)`` -> ``(a red fox)1.3`` (not nested, as A1111 users write them)."""
    return _A1111_WEIGHT.sub(r"(\1)\2", prompt)


def prompt_kwargs(pipe: Any, family: str, prompt: str, negative_prompt: str) -> dict[str, Any]:
    """The prompt arguments of one pipeline call."""
    prompt, negative_prompt = a1111_to_compel(prompt), a1111_to_compel(negative_prompt)
    if family == "sd":
        compel = CompelForSD(pipe, textual_inversion_manager=DiffusersTextualInversionManager(pipe), device=pipe.device)
        out = compel(prompt, negative_prompt=negative_prompt)
        return {"prompt_embeds": out.embeds, "negative_prompt_embeds": out.negative_embeds}
    if family == "sdxl":
        compel = CompelForSDXL(
            pipe, textual_inversion_manager=DiffusersTextualInversionManager(pipe), device=pipe.device
        )
        out = compel(prompt, negative_prompt=negative_prompt)
        return {
            "prompt_embeds": out.embeds,
            "pooled_prompt_embeds": out.pooled_embeds,
            "negative_prompt_embeds": out.negative_embeds,
            "negative_pooled_prompt_embeds": out.negative_pooled_embeds,
        }
    return {"prompt": prompt, "negative_prompt": negative_prompt}
