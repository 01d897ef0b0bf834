"""meld-dali: GPU-fed (NVIDIA DALI) SlowFast R50 training for video emotion recognition on MELD."""

from meld_dali.config import EMOTIONS

__version__ = "0.1.0"
__all__ = ["EMOTIONS", "__version__"]
