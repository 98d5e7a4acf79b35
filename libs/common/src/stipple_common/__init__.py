"""Code shared by every Stipple service: messages, subjects, settings, NATS helpers,
blob stores and the event-sourced task aggregate. Services import only this package.

Importing it also puts Python's recursion limit back where C code stays within its stack.
eth_account imports py_ecc, which raises the limit to 100,000 when first imported; msgspec
then recursed through a JSON document nested ~50,000 deep (100 KB, one request or one NATS
message from a node) past the C stack, and the process died (SIGSEGV) instead of raising
RecursionError. py_ecc is imported here first, so its raise happens now and is undone."""

import sys as _sys

try:
    import py_ecc as _py_ecc  # noqa: F401  (for its side effect, undone below)
except ImportError:  # pragma: no cover - eth_account without py_ecc
    pass

RECURSION_LIMIT = 4000  # deep enough for any Python here; msgspec at this depth uses well under 1 MB of C stack
_sys.setrecursionlimit(RECURSION_LIMIT)

__version__ = "0.1.0"
