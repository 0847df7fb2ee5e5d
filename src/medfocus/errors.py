"""Exception hierarchy. Every error a user can trigger is a :class:`MedfocusError` whose message
names the file/field involved and what was expected.

The classes are also rooted in the built-in exception a caller would naturally catch: a bad value
(:class:`DataError`, :class:`ConfigError`) is a :class:`ValueError`, a model that cannot be found or
loaded (:class:`ModelError`) an :class:`OSError` -- as ``json``/``PIL`` and ``transformers``'
``from_pretrained`` raise for the same situations -- so ``except ValueError`` around
``load_dataset(...)`` or ``except OSError`` around ``load_lvlm(...)`` does what it says. The CLI turns
any :class:`MedfocusError` into a one-line error and exit status 1 in one place
(:class:`medfocus.cli.LazyGroup`).
"""

from __future__ import annotations


class MedfocusError(Exception):
    """Base class of all medfocus errors."""


class DataError(MedfocusError, ValueError):
    """A data file (image, annotation table, benchmark record) is missing or malformed."""


class ModelError(MedfocusError, OSError):
    """A model cannot be resolved, loaded, or used as requested."""


class ConfigError(MedfocusError, ValueError):
    """An invalid option or configuration value."""


class DataWarning(UserWarning):
    """A data file has a defect that medfocus works around by a documented rule (e.g. an unusable
    DICOM window falls back to full-range min-max, expert boxes are clipped to the image); the
    message names the file/field and the rule applied."""
