"""Stipple validator: compares the results of one task, decides the outcome, and
records each node's verdict for QoS, payment and slashing."""
