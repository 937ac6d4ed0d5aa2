"""Prompt-learning methods. Importing this package registers every module in it."""

import importlib
import pkgutil

from alignednorm.methods.base import (
    Method,
    MethodConfig,
    Outputs,
    create_method,
    get_method_class,
    list_methods,
    make_config,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Method", "MethodConfig", "Outputs", "create_method", "get_method_class", "list_methods", "make_config",
    "register_method",
]
