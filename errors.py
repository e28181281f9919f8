"""The small exception tree. Each class carries a decision the main loop acts on."""


class DbWriterError(Exception):
    """Base of db-writer's own errors."""


class ConfigError(DbWriterError):
    """A setting is invalid: start-up stops with this one-line message and exit status 2."""


class StartupError(DbWriterError):
    """The service cannot start. Exit status 1 for a state that may change (schema not
    migrated, consumer name in use), 2 for a setting to fix (a refused password, a missing
    database or role, a refused certificate)."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class TransientError(DbWriterError):
    """A server is unreachable or busy: retry later; the entries stay pending, never dead-lettered."""


class Refused(TransientError):
    """The database refused a batch for a reason that says nothing about its rows (a
    permission, a missing column, a trigger that refuses everything): retried, loudly,
    and never turned into dead letters, until someone fixes the cause."""


class LockTimeout(TransientError):
    """A lock wait ran out (DB_LOCK_TIMEOUT_SEC): another worker holds some of the batch's
    keys in an open transaction, maybe frozen. The batch is put aside and tried again
    later; the worker goes on with other entries meanwhile."""


class PermanentAtStart(TransientError):
    """A server refused us for a reason time will not fix (credentials, a missing database
    or role, a refused certificate). At start-up this stops the worker at once (exit 2);
    once it has run, the same error is logged and retried (a password rotated mid-run)."""
