"""Where the bundled guests and the guest-side asm library live.

In a checkout they are the top-level ``guests/`` and ``asm/``; an installed
package carries them as package data ``hv/guests`` and ``hv/asmlib``
(pyproject.toml maps one onto the other).
"""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _data_dir(installed: str, checkout: str) -> Path:
    inside = _HERE / installed
    return inside if inside.is_dir() else _HERE.parent / checkout


def guests_dir() -> Path:
    return _data_dir("guests", "guests")


def asm_lib_dir() -> Path:
    return _data_dir("asmlib", "asm")


def bundled_guests() -> dict[str, Path]:
    """Name -> path of every sample guest shipped with hv."""
    return {p.stem: p for p in sorted(guests_dir().iterdir()) if p.suffix in (".s", ".bin")}
