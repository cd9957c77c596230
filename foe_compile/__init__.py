"""foe_compile: convert Mixture-of-Experts transformers to the Federation-of-Experts form."""
from . import backend
from .builtin import builtin_config, builtin_model
from .config import FoEConfig
from .convert import convert, from_pretrained
from .report import ConversionReport

__all__ = ["ConversionReport", "FoEConfig", "builtin_config", "builtin_model", "convert", "from_pretrained"]

backend.register()  # torch.compile(model, backend="foe")
