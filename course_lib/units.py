"""Sizes written for people: one ``format_bytes`` for the whole course.

Message and buffer sizes are powers of two and read best in binary units (4096 B = 4 KiB);
model and GPU memory is quoted by vendors in decimal units (an 80 GB GPU holds 80·10⁹ bytes).
"""

from __future__ import annotations


def format_bytes(nbytes: float, decimal: bool = False) -> str:
    """4096 -> '4 KiB'; with ``decimal=True``, 80e9 -> '80 GB' (3 significant digits)."""
    if decimal:
        for unit in ("B", "KB", "MB", "GB", "TB"):
            if abs(nbytes) < 1000 or unit == "TB":
                return f"{nbytes:.3g} {unit}" if unit != "B" else f"{nbytes:.0f} B"
            nbytes /= 1000
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:g} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")
