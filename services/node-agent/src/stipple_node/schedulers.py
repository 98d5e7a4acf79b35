"""Samplers: AUTOMATIC1111 names and diffusers scheduler classes, built fresh per call.

Every call gets a new scheduler built from the model's own scheduler config, so no state
leaks from one task into the next and the cached pipeline is never changed. The A1111
overrides are explicit, so that a model whose default scheduler uses Karras sigmas does
not turn "DPM++ 2M" into "DPM++ 2M Karras".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from stipple_common.errors import InvalidInput
from stipple_common.taskspec import SAMPLERS as TASK_SAMPLERS
from stipple_common.taskspec import SchedulerSpec

if TYPE_CHECKING:
    from diffusers.configuration_utils import ConfigMixin

    # ConfigMixin's config_name is None where SchedulerMixin's is a file name: diffusers' own
    # scheduler classes (EulerDiscreteScheduler(SchedulerMixin, ConfigMixin), ...) mix them the same way
    class Scheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc]
        """What every diffusers scheduler class is (a SchedulerMixin with its config);
        diffusers has no name for it."""


_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {**_DPMPP, "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {**_DPMPP, "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {**_DPMPP, "algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {**_DPMPP, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
}
assert set(SAMPLERS) == set(TASK_SAMPLERS), "taskspec.SAMPLERS and the node's map must name the same samplers"


def _from_config(cls: type[Scheduler], base: Scheduler, args: Mapping[str, Any]) -> Scheduler:
    # from_config returns (scheduler, unused kwargs) only when asked to (return_unused_kwargs=True),
    # but diffusers types it as returning either, without an overload
    scheduler: Scheduler = cls.from_config(base.config, **args)  # type: ignore[assignment]
    return scheduler


def make_scheduler(base: Scheduler, *, sampler: str | None, spec: SchedulerSpec | None) -> Scheduler:
    """A fresh scheduler for one call: the named sampler, the named diffusers class with
    its args, or the model's own kind; always from the model's config. The names were
    checked with the task (`taskspec.check_spec`); only the args are checked here."""
    if spec is not None:
        try:
            return _from_config(getattr(diffusers, spec.method), base, spec.args or {})
        except (TypeError, ValueError) as exc:
            raise InvalidInput("scheduler.args", spec.args, str(exc)) from None
    if sampler is not None:
        class_name, overrides = SAMPLERS[sampler]
        return _from_config(getattr(diffusers, class_name), base, overrides)
    return _from_config(type(base), base, {})
