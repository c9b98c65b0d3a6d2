"""Exceptions that name what went wrong and where (file, field, value)."""

from __future__ import annotations


class LMEncodersError(Exception):
    """Base class of every error raised by lmencoders."""


class DescriptionError(LMEncodersError, ValueError):
    """A state description is malformed or does not fit the observations."""


class ObservationError(LMEncodersError, ValueError):
    """Observations cannot be written as text (NaN, inf, out of range)."""


class TextTooLongError(LMEncodersError, ValueError):
    """A piece of text that cannot be split does not fit the LM's window."""


class ModelNotFoundError(LMEncodersError, OSError):
    """The requested language model cannot be loaded from disk."""


class ModelMismatchError(LMEncodersError, RuntimeError):
    """A checkpoint was trained with other LM weights than the ones loaded now."""


class UnreachableTokenError(LMEncodersError, RuntimeError):
    """A text produced a token outside the embedding rows that ln_embed trains."""


class ConfigError(LMEncodersError, ValueError):
    """A run's settings name something unknown or contradict each other."""


class FeatureError(LMEncodersError, RuntimeError):
    """The LM produced features that cannot be used (NaN or inf); nothing was cached."""


class UnsafeFileError(LMEncodersError, ValueError):
    """A file whose loading would run code from it (a pickle) was not explicitly trusted."""
