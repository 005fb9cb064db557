"""Errors a user can cause and fix. The CLI prints their message alone, without a traceback."""


class VaeLabError(Exception):
    """A mistake the user can fix; the message says what was wrong and what to do."""


class ConfigError(VaeLabError):
    """A setting with a value that is not allowed."""


class CheckpointError(VaeLabError):
    """A checkpoint that is missing, unreadable, foreign or unsafe."""
