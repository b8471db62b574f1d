"""Errors the pipeline raises; each message says what was wrong and what to do."""


class GreedyError(Exception):
    """Base class: a refusal or failure the command line reports without a traceback."""


class DataError(GreedyError):
    """The source data or a prepared dataset is missing or malformed."""


class RunStateError(GreedyError):
    """A run directory is not in the state a command needs (stage not trained, cache stale)."""


class CacheError(GreedyError):
    """A cache is missing, incomplete, or does not match the stage it claims to hold."""
