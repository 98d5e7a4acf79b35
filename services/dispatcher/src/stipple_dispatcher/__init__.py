"""Stipple dispatcher: picks the nodes for each task and hands them their work."""
