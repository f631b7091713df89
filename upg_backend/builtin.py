"""The built-in model: a small chat model shipped inside the package, used when no model is named."""
from __future__ import annotations

from pathlib import Path

BUILTIN_MODEL = Path(__file__).parent / "models" / "builtin.upg"


def builtin_model_path() -> Path:
    """The path of the built-in model file.

    Raises:
        FileNotFoundError: this installation has no built-in model.
    """
    if not BUILTIN_MODEL.is_file():
        raise FileNotFoundError(f"the built-in model is not installed ({BUILTIN_MODEL} is missing); name a .upg file instead")
    return BUILTIN_MODEL
