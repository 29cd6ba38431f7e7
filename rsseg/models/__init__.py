"""Networks. The pipeline creates them only through :mod:`rsseg.models.registry`."""

from rsseg.models.registry import (
    ModelInfo,
    count_parameters,
    create_model,
    list_models,
    model_info,
    parameter_count,
    register_model,
)

__all__ = [
    "ModelInfo",
    "count_parameters",
    "create_model",
    "list_models",
    "model_info",
    "parameter_count",
    "register_model",
]
