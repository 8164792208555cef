"""Parallelism from Scratch: the course's library, one module per strategy."""
