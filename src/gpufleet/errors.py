"""gpufleet's exception tree.

Every error gpufleet raises on purpose is a ``GpufleetError``. Each class says
whether it is ``transient`` (worth retrying later: the reconciler backs off and
tries again next tick) or terminal (retrying changes nothing). The API layer
maps these to HTTP statuses in one place (``gpufleet.api.errors``); provider
clients map HTTP responses to them in one place each (``check_response``).

    GpufleetError
    ├── ConfigError                      bad configuration (startup)
    ├── Conflict                         valid request, but the state forbids it (409)
    ├── AuthError
    │   ├── Unauthenticated              no key, or an unknown/revoked one (401)
    │   ├── Forbidden                    the key's role or limits forbid it (403)
    │   ├── LimitExceeded(retry_after)   rate / concurrency / queue limit (429)
    │   └── BudgetExhausted              the team's day/month spend budget is spent (402)
    ├── StoreError                       Redis unreachable or a script failed   (transient)
    ├── ProviderError                    a cloud API call failed
    │   ├── NotFound                     instance does not exist (delete treats it as done)
    │   ├── InvalidState                 benign: "already starting", illegal transition
    │   ├── InsufficientCapacity         no GPU of that product free            (transient)
    │   ├── QuotaOrBalance               balance, quota or instance-limit hit
    │   ├── AuthFailed                   401/403: key missing or wrong
    │   ├── RateLimited(retry_after)     429                                     (transient)
    │   ├── ProviderUnavailable          5xx, timeout, connection error          (transient)
    │   └── ProviderBadResponse          answered, but not in a shape we understand
    ├── EngineError                      a worker (ComfyUI/Ollama) call failed
    │   ├── EngineUnavailable            worker down, 5xx, timeout, dropped     (transient)
    │   └── EngineRejected               worker refused the work (bad graph)     (terminal)
    └── TaskError
        ├── TaskNotFound
        ├── TaskConflict (also Conflict) e.g. cancelling a finished task
        └── IdempotencyConflict          same key, different request
"""

from __future__ import annotations

from typing import Any


class GpufleetError(Exception):
    """Base of every error gpufleet raises on purpose."""

    transient: bool = False
    code: str = "internal_error"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message or self.__class__.__name__


class ConfigError(GpufleetError):
    """Configuration is invalid; ``problems`` lists one ``key: problem`` line each."""

    code = "config_error"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


class Conflict(GpufleetError):
    """The request is valid but the resource's state forbids it now (HTTP 409)."""

    code = "conflict"


class AuthError(GpufleetError):
    """The caller may not do this."""

    code = "unauthorized"


class Unauthenticated(AuthError):
    code = "unauthorized"


class Forbidden(AuthError):
    code = "forbidden"


class LimitExceeded(AuthError):
    """A per-key limit (rate, concurrency, queued tasks) is reached (HTTP 429)."""

    code = "rate_limited"

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BudgetExhausted(AuthError):
    """The team's spend budget for the day or month is spent: no new work until it resets
    (HTTP 402). Work already running is never stopped."""

    code = "budget_exhausted"

    def __init__(
        self, message: str = "", *, team: str = "", period: str = "", resets_at: float = 0.0
    ) -> None:
        super().__init__(message)
        self.team = team
        self.period = period
        self.resets_at = resets_at


class StoreError(GpufleetError):
    transient = True
    code = "store_unavailable"


# -- providers ---------------------------------------------------------------------------


class ProviderError(GpufleetError):
    code = "provider_error"

    def __init__(
        self, message: str = "", *, provider: str = "", status: int | None = None, **details: Any
    ) -> None:
        super().__init__(message, **details)
        self.provider = provider
        self.status = status


class NotFound(ProviderError):
    code = "not_found"


class InvalidState(ProviderError):
    code = "invalid_state"


class InsufficientCapacity(ProviderError):
    transient = True
    code = "insufficient_capacity"


class QuotaOrBalance(ProviderError):
    code = "quota_or_balance"


class AuthFailed(ProviderError):
    code = "provider_auth_failed"


class RateLimited(ProviderError):
    transient = True
    code = "rate_limited"

    def __init__(self, message: str = "", *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ProviderUnavailable(ProviderError):
    transient = True
    code = "provider_unavailable"


class ProviderBadResponse(ProviderError):
    transient = True
    code = "provider_bad_response"


# -- engines -----------------------------------------------------------------------------


class EngineError(GpufleetError):
    code = "engine_error"


class EngineUnavailable(EngineError):
    transient = True
    code = "engine_unavailable"


class EngineRejected(EngineError):
    code = "engine_rejected"


# -- tasks -------------------------------------------------------------------------------


class TaskError(GpufleetError):
    code = "task_error"


class TaskNotFound(TaskError):
    code = "not_found"


class TaskConflict(TaskError, Conflict):
    code = "conflict"


class IdempotencyConflict(TaskError):
    code = "idempotency_conflict"
