"""Transports that carry device sessions; each one only reads, writes and closes."""
