"""Exception hierarchy. Every error a user can trigger is a :class:`MedfocusError` whose message
names the file/field involved and what was expected."""

from __future__ import annotations


class MedfocusError(Exception):
    """Base class of all medfocus errors."""


class DataError(MedfocusError):
    """A data file (image, annotation table, benchmark record) is missing or malformed."""


class ModelError(MedfocusError):
    """A model cannot be resolved, loaded, or used as requested."""


class ConfigError(MedfocusError):
    """An invalid option or configuration value."""


class DataWarning(UserWarning):
    """A data file has a defect that medfocus works around by a documented rule (e.g. an unusable
    DICOM window falls back to full-range min-max, expert boxes are clipped to the image); the
    message names the file/field and the rule applied."""
