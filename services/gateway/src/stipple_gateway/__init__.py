"""Stipple gateway: the REST API applications call (native /v1 and SDCN shapes)."""
