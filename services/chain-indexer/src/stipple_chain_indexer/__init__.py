"""Stipple chain-indexer: follows the contracts into the CHAIN stream and turns task
outcomes into escrow, settlement, refund and slash transactions."""
