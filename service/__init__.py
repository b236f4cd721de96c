"""IsoQuant service: FastAPI app around ``kernels.Quantizer`` (see docs/OPERATIONS.md)."""

__version__ = "0.1.0"
