"""Exceptions shown to users as one clear line (the CLI maps them to exit code 2)."""


class LowbitError(Exception):
    """Base class for errors caused by user input (files, arguments, models)."""


class FormatError(LowbitError):
    """A .lowbit container is corrupt, truncated or of an unsupported version."""


class SourceError(LowbitError):
    """A Hugging Face checkpoint cannot be read or is not supported."""


class ContextOverflowError(LowbitError):
    """A prompt plus the requested tokens does not fit the context window."""
