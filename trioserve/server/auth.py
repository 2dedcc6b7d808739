"""Connection tokens (JWT, via PyJWT) and what they allow.

A token's claims: ``sub`` (the client id), ``exp``, and optionally
``subscribe`` / ``publish`` (lists of topic glob patterns such as ``chat.*``)
and ``presence`` (bool). Verification pins the accepted algorithms to the key
type that is configured, so ``alg: none`` and HS/RS confusion (an HMAC token
"signed" with the public key) are refused by construction, not by a check
that could be forgotten.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jwt

from ..config import Config
from ..protocol.claims import AuthError, Claims

__all__ = ["Authenticator"]


def _patterns(value: object, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise AuthError("token_invalid", f"claim '{name}' must be a list of topic patterns")


class Authenticator:
    """Verifies tokens against one key (an HMAC secret or a public key)."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        algorithms: Sequence[str] | None = None,
        audience: str | None = None,
        issuer: str | None = None,
    ):
        if (secret is None) == (public_key is None):
            raise ValueError("give exactly one of secret and public_key")
        self._key: Any = secret if secret is not None else public_key
        hmac_key = secret is not None
        if algorithms is None:
            algorithms = ("HS256",) if hmac_key else ("RS256", "ES256")
        wrong = [a for a in algorithms if a.startswith("HS") != hmac_key or a.lower() == "none"]
        if wrong:
            raise ValueError(f"algorithms {wrong} do not match the configured key type")
        self.algorithms = tuple(algorithms)
        self.audience = audience
        self.issuer = issuer

    @classmethod
    def from_config(cls, config: Config) -> Authenticator | None:
        """The authenticator *config* describes, or None if it sets no token key."""
        if config.token_secret is None and config.token_public_key is None:
            return None
        return cls(
            secret=config.token_secret,
            public_key=config.token_public_key,
            algorithms=config.token_algorithms,
            audience=config.token_audience,
            issuer=config.token_issuer,
        )

    def verify(self, token: str, now: float | None = None) -> Claims:
        """The claims of a valid *token*; raises :class:`AuthError` naming the problem."""
        if not token:
            raise AuthError("token_missing", "no token given")
        options = {"require": ["exp", "sub"], "verify_aud": self.audience is not None}
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
                options=options,  # type: ignore[arg-type]
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token_not_yet_valid", "the token is not valid yet (nbf/iat)") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(
                "algorithm_not_allowed",
                f"token algorithm not allowed (accepted: {', '.join(self.algorithms)})",
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "the token's signature does not verify") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong_audience", f"the token is not for audience {self.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong_issuer", f"the token was not issued by {self.issuer!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("token_invalid", f"the token lacks the '{exc.claim}' claim") from None
        except jwt.InvalidKeyError:
            # An algorithm we accept, but not for this key's type (ES256 against
            # an RSA key): the token cannot have been signed by our key.
            raise AuthError("algorithm_not_allowed",
                            "the token's algorithm does not match the configured key") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError("token_invalid", f"malformed token: {exc}") from None
        sub = payload["sub"]
        if not isinstance(sub, str) or not sub:
            raise AuthError("token_invalid", "claim 'sub' must be a non-empty string")
        exp = payload["exp"]
        if now is not None and exp <= now:
            raise AuthError("token_expired", "the token has expired")
        return Claims(
            sub=sub,
            exp=float(exp),
            subscribe=_patterns(payload.get("subscribe"), "subscribe"),
            publish=_patterns(payload.get("publish"), "publish"),
            presence=payload.get("presence") is True,
        )
