"""Model zoo of napari-tae: transformer autoencoders (b_tae, sc_tae, dc_tae, h_tae, h_tae_s),
CNN baselines (ae_dense, ae_spatial, vae, vq_vae) and the intensity baseline.

``build_model(name, **overrides)`` builds the paper config of ``name`` with overrides applied;
``python -m napari_tae.models`` prints the table of models, configs and parameter counts.
"""
from ._registry import (
    build_config,
    build_model,
    count_parameters,
    format_model_table,
    list_models,
    model_defaults,
    model_info,
    register_model,
)

# importing the family modules registers their entrypoints (order = listing order)
from . import tae, hierarchical, cnn, intensity  # noqa: E402,F401  isort: skip
from ._base import ReconstructionModel

__all__ = [
    "ReconstructionModel",
    "build_config",
    "build_model",
    "count_parameters",
    "format_model_table",
    "list_models",
    "model_defaults",
    "model_info",
    "register_model",
]
