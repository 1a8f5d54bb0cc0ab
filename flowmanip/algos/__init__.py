"""Losses: flow matching (pretraining, BC term) and SAC Flow (online)."""
