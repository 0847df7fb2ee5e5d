"""medfocus: causal visual attribution for chest X-ray reasoning in large vision-language models."""

from medfocus.errors import MedfocusError, DataError, ModelError
from medfocus.types import Box, Sample, QUESTION_STEM, SUFFIXES, build_question

__version__ = "0.1.0"

__all__ = [
    "MedfocusError",
    "DataError",
    "ModelError",
    "Box",
    "Sample",
    "QUESTION_STEM",
    "SUFFIXES",
    "build_question",
    "__version__",
]
