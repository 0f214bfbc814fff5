"""The console's refusals: each a `TrmError` with a stable reason and the HTTP status it gets."""

from __future__ import annotations

from broker.errors import TrmError


class ConsoleError(TrmError):
    """A request the console refuses; `status` is the HTTP status it answers with."""

    reason = "console"
    status = 400


class NotSignedIn(ConsoleError):
    """No valid session or API token came with the request."""

    reason = "not_signed_in"
    status = 401


class SignInRefused(ConsoleError):
    """The username or password is wrong, or the account is disabled (never which)."""

    reason = "sign_in_refused"
    status = 401


class TooManyAttempts(ConsoleError):
    """Too many refused sign-ins for this username or from this address lately."""

    reason = "rate_limited"
    status = 429


class Forbidden(ConsoleError):
    """Signed in, but the role or the token's scopes do not allow this."""

    reason = "forbidden"
    status = 403


class CsrfRefused(ConsoleError):
    """A form post without this session's CSRF token."""

    reason = "csrf"
    status = 403


class NotFound(ConsoleError):
    """No such envelope, case, record or account here."""

    reason = "not_found"
    status = 404


class Gone(ConsoleError):
    """The payload was erased (consent withdrawn with deletion)."""

    reason = "erased"
    status = 410


class AccountError(ConsoleError):
    """An account or token cannot be created or changed as asked."""

    reason = "account"
    status = 422


class UploadTooLarge(ConsoleError):
    """An upload streamed past its route's limit (`console.guards.BodyLimit`)."""

    reason = "too_large"
    status = 413
