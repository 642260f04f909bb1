"""``vsl extract``: photos -> bottom-up-attention region features in the SCAN layout, resumable
and shardable under torchrun (:mod:`.pipeline`), on the row files and block logs of :mod:`.rows`;
:mod:`.command` holds the command line's options."""
from .command import DESCRIPTION, add_arguments, run
from .pipeline import BLOCK_IMAGES, ExtractResult, extract_images, final_paths

__all__ = ["DESCRIPTION", "add_arguments", "run", "BLOCK_IMAGES", "ExtractResult", "extract_images", "final_paths"]
