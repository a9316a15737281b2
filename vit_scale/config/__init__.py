from vit_scale.config.loader import ConfigError, from_dict, load_config, save_config, to_dict
from vit_scale.config.schema import Config
from vit_scale.config.validate import Batch, resolve_batch, validate

__all__ = [
    "Batch",
    "Config",
    "ConfigError",
    "from_dict",
    "load_config",
    "resolve_batch",
    "save_config",
    "to_dict",
    "validate",
]
