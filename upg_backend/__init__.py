"""upg-backend: local inference for Phi-4 and the Phi family, with a llama-cpp-python-style API."""
import importlib.metadata

from ._core import UPGFormatError
from .llama import Llama, LlamaState
from .sampling import SamplingParams

__version__ = importlib.metadata.version("upg-backend")
__all__ = ["Llama", "LlamaState", "SamplingParams", "UPGFormatError", "__version__"]
