"""Errors a user can act on. The CLI prints them as one line; anything else is a bug and keeps its traceback."""


class EngineError(Exception):
    """Base class for bad input: configs, data, stores. The message names the file or key."""


class ConfigError(EngineError):
    """A config file or command-line override is invalid."""


class StorageError(EngineError):
    """A path or URL cannot be read or written (missing file, missing bucket, no permission)."""


class DataError(EngineError):
    """Input data is unusable: a corrupt shard, a manifest that does not match, an empty data set."""
