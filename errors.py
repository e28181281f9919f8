"""The small exception tree. Each class carries a decision the main loop acts on."""


class DbWriterError(Exception):
    """Base of db-writer's own errors."""


class ConfigError(DbWriterError):
    """A setting is invalid: start-up stops with this one-line message and exit status 2."""


class StartupError(DbWriterError):
    """The service cannot start (schema not migrated, consumer name in use): exit status 1."""


class TransientError(DbWriterError):
    """A server is unreachable or busy: retry later; the entries stay pending, never dead-lettered."""
