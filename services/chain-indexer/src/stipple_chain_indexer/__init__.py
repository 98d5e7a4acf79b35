"""Stipple chain-indexer: not built yet (see services/chain-indexer/README.md)."""
