"""Prompt-learning methods. Importing this package registers every module in it."""

import importlib
import pkgutil

from alignednorm.methods.base import (
    RULES,
    Method,
    MethodConfig,
    Outputs,
    StepState,
    check_config_keys,
    check_rule,
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
    "RULES", "Method", "MethodConfig", "Outputs", "StepState", "check_config_keys", "check_rule", "create_method",
    "get_method_class", "list_methods", "make_config", "register_method",
]
