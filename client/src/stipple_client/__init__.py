"""Stipple's Python client: submit image tasks to a Stipple gateway, follow them, fetch the images.

    from stipple_client import Client

    with Client("http://127.0.0.1:8080") as stipple:
        made = stipple.generate("a red fox", model="tiny-sd", width=128, height=128, steps=8)
        open("fox.png", "wb").write(made.images[0])

`AsyncClient` has the same methods as coroutines. It speaks the gateway's native API
(``/v1/tasks``, docs/api.md) and depends on httpx only.
"""

from ._async import AsyncClient
from ._core import __version__
from ._sync import Client
from .errors import (
    Conflict,
    InvalidInput,
    NotFound,
    RateLimited,
    StippleError,
    TaskFailed,
    Unauthorized,
    Unavailable,
)
from .models import Event, Generation, Image, Node, Outcome, QueuePlace, Submitted, Task

__all__ = [
    "AsyncClient",
    "Client",
    "Conflict",
    "Event",
    "Generation",
    "Image",
    "InvalidInput",
    "Node",
    "NotFound",
    "Outcome",
    "QueuePlace",
    "RateLimited",
    "StippleError",
    "Submitted",
    "Task",
    "TaskFailed",
    "Unauthorized",
    "Unavailable",
    "__version__",
]
