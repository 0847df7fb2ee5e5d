"""medfocus.attribution: the ten baseline attribution methods behind one interface.

``get_method(name, **params).attribute(adapter, image, question, answer) -> Attribution``;
``list_methods()`` gives ``{name: defaults}`` (the paper's). See :mod:`medfocus.attribution.base`.
"""

from medfocus.attribution.base import BASELINES, Attribution, Method, get_method, list_methods, register_method

__all__ = ["Attribution", "BASELINES", "Method", "get_method", "list_methods", "register_method"]
