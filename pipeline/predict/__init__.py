"""Predict stage: batch inference that writes labels on each source's exact grid, resumable via a ledger."""
