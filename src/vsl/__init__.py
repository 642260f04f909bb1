"""vsl: image-text retrieval with the Visual Semantic Loss (ICME 2023) on SGR, SAF and SGRAF."""
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .config import PRESETS, Config, preset
from .errors import CheckpointError, ConfigError, DataError, VSLError
from .models import VSLModel, build_model

__version__ = "0.1.0"

__all__ = [
    "Config", "PRESETS", "preset", "VSLModel", "build_model", "load_checkpoint", "read_checkpoint",
    "save_checkpoint", "VSLError", "DataError", "CheckpointError", "ConfigError", "__version__",
]
