"""The retrieval models: region and word encoders, the SGR/SAF similarity networks, one factory."""
from .model import VSLModel, build_model

__all__ = ["VSLModel", "build_model"]
