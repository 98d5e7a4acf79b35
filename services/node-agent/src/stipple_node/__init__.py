"""Stipple node agent: runs on an operator's GPU box, announces what it can serve,
runs diffusers for its assignments, uploads the images and publishes the results."""
