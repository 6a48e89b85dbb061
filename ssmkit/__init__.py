"""ssmkit: state-space models (Mamba, S4, Hyena, GLA) for vision, audio, genomics and pathology."""
from ssmkit.registry import create_model, list_models, load_official, register_model

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_official", "register_model", "__version__"]
