"""Sending: the live path (a chunk fan-out under rate limits, the breaker, the budget) and the batch path."""
