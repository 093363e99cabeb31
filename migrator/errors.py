"""Every error migrator raises, and the exit code each one maps to.

The tree (exit code in brackets)::

    MigratorError                      [1]  root; runtime failures are resumable
    ├── InputError                     [2]  bad input or usage, found before anything is written
    │   ├── PlanError                       plan file: YAML, a field, an unset ${VAR}
    │   ├── PreflightError                  the target: source missing/wrong type, shard key taken,
    │   │                                   no memory headroom, no live app instance
    │   ├── JobNotFound                     no job of that name in the state store
    │   ├── PlanConflict                    a changed plan for an existing active job
    │   └── IllegalTransition               a phase change the transition table forbids
    ├── RedisUnavailable               [1]  the server cannot be reached or refused us
    ├── StoreUnavailable               [1]  the state store cannot be reached or refused us
    ├── BarrierTimeout                 [1]  live app instances did not acknowledge an epoch in time
    ├── Interrupted                    [1]  SIGINT/SIGTERM: the batch finished, checkpoint kept
    ├── JobBusy                        [1]  another runner process holds the job's lease
    ├── VerificationFailed             [3]  confirmed differences remain between old and shards
    └── ShimError                      [1]  raised inside applications (migrator/shim/errors.py)
        ├── ShimNotConfigured               no control record yet and no source_key given
        ├── ShimWrongType                   the job's source is not a hash
        ├── ShimClosed                      the router was closed
        └── ShimReservedValue               the value written is migrator's delete mark

Errors become exit codes in exactly one place: :func:`migrator.cli.main`.
"""

from __future__ import annotations


class MigratorError(Exception):
    """Root of every error migrator raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class InputError(MigratorError):
    """Bad input or usage. Raised before anything is written to Redis or the state store."""

    exit_code = 2


class PlanError(InputError):
    """The plan file cannot be read, parsed or validated."""


class PreflightError(InputError):
    """The target Redis does not allow this plan to start."""


class JobNotFound(InputError):
    """No job of that name exists in the state store."""


class PlanConflict(InputError):
    """A plan was applied under the name of an active job with a different spec."""


class IllegalTransition(InputError):
    """A phase change the transition table does not allow."""


class RedisUnavailable(MigratorError):
    """The Redis server could not be reached, or refused a command."""


class StoreUnavailable(MigratorError):
    """The state store (SQLite file, PostgreSQL server) could not be opened or refused a
    statement."""


class SourceVanished(MigratorError):
    """The source key disappeared (expired, or deleted outside the shim) while it was copied."""


class ServerRestarted(MigratorError):
    """The server restarted or failed over while a scan was under way: its cursor means nothing
    to the new process (each seeds its hash tables afresh), so the scan starts over."""


class BarrierTimeout(MigratorError):
    """Live application instances did not acknowledge the published epoch in time."""


class Interrupted(MigratorError):
    """A stop was requested; the current batch finished and its checkpoint is committed."""


class LeaseLost(Interrupted):
    """The runner lost the job's lease mid-work (another process took it over, or Redis did not
    answer for the lease's TTL): it stopped after its last acknowledged batch."""


class JobBusy(MigratorError):
    """Another runner process (plan apply, verify, cleanup, `migrator run`, ...) is working
    the job; one process at a time holds its lease."""


class VerificationFailed(MigratorError):
    """Verification confirmed differences between the source key and the shards."""

    exit_code = 3
