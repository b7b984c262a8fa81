"""What can go wrong when the sidecar delivers a robot message, and which HTTP answer each failure earns.

Owns the exception tree and the sidecar's own error codes; it does not decide retries or render error bodies.

    RobotError
     ├── UnknownTarget     404  no robot of that name in the config
     ├── BadMessage        400  the caller's payload is malformed (or too large to ever be accepted: 413)
     ├── Refused           4xx  the platform refused for good: bad sign, keyword, disabled robot, dissolved group
     └── Unavailable       503  transient: network, 5xx, "busy"; the sender should try again later
          └── RateLimited  503  (429 on /robots) our own limiter cannot fit the send into the deadline
"""

from __future__ import annotations


class SidecarCode:
    """Codes the sidecar puts in the platform-shaped body when the failure is its own, not the platform's."""

    BAD_MESSAGE = 990400
    UNKNOWN_TARGET = 990404
    TOO_LARGE = 990413
    RATE_LIMITED = 990429
    UNAVAILABLE = 990503


class RobotError(Exception):
    status = 500
    code = SidecarCode.UNAVAILABLE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownTarget(RobotError):
    status = 404
    code = SidecarCode.UNKNOWN_TARGET


class BadMessage(RobotError):
    status = 400
    code = SidecarCode.BAD_MESSAGE


class TooLarge(BadMessage):
    status = 413
    code = SidecarCode.TOO_LARGE


class Refused(RobotError):
    """The platform answered with an error a retry cannot fix; carries the platform's own code."""

    def __init__(self, message: str, *, platform_code: int, status: int = 400) -> None:
        super().__init__(message)
        self.code = platform_code
        self.status = status


class Unavailable(RobotError):
    status = 503

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(Unavailable):
    code = SidecarCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)
