"""medfocus.attribution: the baseline attribution methods behind one interface.

``get_method(name, **params).attribute(adapter, image, question, answer) -> Attribution``;
``list_methods()`` gives ``{name: defaults}`` (the paper's). See :mod:`medfocus.attribution.base`.
``attribute_many(adapter, image, question, answer, methods)`` runs several methods on one prepared sample
with shared passes (:mod:`medfocus.attribution.suite`).
"""

from medfocus.attribution._common import PreparedSample, prepare_sample
from medfocus.attribution.base import (BASELINES, Attribution, Method, get_method, list_methods, method_answer_scope, method_source,
                                      register_method)
from medfocus.attribution.suite import attribute_many

__all__ = ["Attribution", "BASELINES", "Method", "PreparedSample", "attribute_many", "get_method", "list_methods", "method_answer_scope",
           "method_source", "prepare_sample", "register_method"]
