"""A CPU emulator of the CUDA execution model for the CUDA tests (see plugin.py)."""
