"""IsoQuant client: the SDK (``IsoQuantClient``, ``AsyncIsoQuantClient``) and the ``isoquant`` command.

Depends on numpy, httpx and safetensors only; imports neither torch nor the server's ``kernels``.
See docs/CLIENTS.md.
"""

from clients._codec import Distortion, PackedCodes
from clients.client import DEFAULT_URL, AsyncIsoQuantClient, IsoQuantClient
from clients.errors import (
    BadRequestError,
    IsoQuantError,
    OverloadedError,
    PayloadTooLargeError,
    ProtocolError,
    ServerError,
    TransportError,
    UnauthorizedError,
    ValidationError,
)

__all__ = [
    "DEFAULT_URL",
    "AsyncIsoQuantClient",
    "BadRequestError",
    "Distortion",
    "IsoQuantClient",
    "IsoQuantError",
    "OverloadedError",
    "PackedCodes",
    "PayloadTooLargeError",
    "ProtocolError",
    "ServerError",
    "TransportError",
    "UnauthorizedError",
    "ValidationError",
]
