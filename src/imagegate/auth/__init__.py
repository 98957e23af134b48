"""Client keys: who is calling (`KeyRing`), the ASGI middleware that asks (`AuthMiddleware`), and
what a key may do (`ClientKey.check_model`, `ClientKey.allows`)."""

from imagegate.auth.keys import ClientKey, KeyLimits, KeyRing, ModelNotAllowed
from imagegate.auth.middleware import AuthMiddleware, client_of

__all__ = ["AuthMiddleware", "ClientKey", "KeyLimits", "KeyRing", "ModelNotAllowed", "client_of"]
