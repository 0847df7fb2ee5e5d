"""medfocus.attribution: the baseline attribution methods behind one interface.

``get_method(name, **params).attribute(adapter, image, question, answer) -> Attribution``;
``list_methods()`` gives ``{name: defaults}`` (the paper's). See :mod:`medfocus.attribution.base`.
"""

from medfocus.attribution.base import BASELINES, Attribution, Method, get_method, list_methods, method_source, register_method

__all__ = ["Attribution", "BASELINES", "Method", "get_method", "list_methods", "method_source", "register_method"]
