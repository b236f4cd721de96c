"""``QuantizerError``: the one exception ``Quantizer`` raises for input it refuses.

It is a ``ValueError`` (so ``except ValueError`` and the messages callers already match keep working) that
also says, as data, what was refused (``field``) and why (``kind``), so that a caller such as the service
can map it to its own answer without reading the message:

>>> from kernels import Quantizer, QuantizerError
>>> try:
...     Quantizer(bits=9)
... except QuantizerError as exc:
...     (exc.field, exc.kind)
('bits', 'value')
"""

from __future__ import annotations

from typing import Literal, get_args

ErrorKind = Literal["value", "type", "dtype", "shape", "device", "non_finite", "overflow", "fingerprint"]
"""Why an input was refused:

value        a scalar argument outside what is allowed (variant, dim, bits, seed, backend)
type         not the kind of object asked for (``x`` not a tensor, ``packed`` not a ``Packed``)
dtype        a tensor of, or an output dtype that is not, an allowed dtype
shape        a tensor of the wrong shape (last dimension, bytes a vector, norms not the codes' leading shape)
device       a tensor on another device than the quantizer's
non_finite   NaN or Inf in the vectors (or in the norms of codes)
overflow     finite vectors whose float32 norm overflows (their squares pass float32's range)
fingerprint  codes made by another quantizer, or in another format version
"""

KINDS: frozenset[str] = frozenset(get_args(ErrorKind))


class QuantizerError(ValueError):
    """Input a ``Quantizer`` refuses.

    message: what is wrong and what is allowed. It starts with the name of what it is about, ``field``
        (the argument or tensor name as the library's API spells it: "x", "codes", "norms", "dtype",
        "variant", "dim", "bits", "seed", "backend", "packed", "fingerprint"); ``message_calling`` re-words
        it for a caller that calls that thing something else.
    field: that name, or None when the error is about no one argument.
    kind: why it was refused, one of ``KINDS`` (see ``ErrorKind``).
    """

    def __init__(self, message: str, *, field: str | None, kind: ErrorKind) -> None:
        if kind not in KINDS:
            # A programming error at the raise site: fail loudly there rather than hand out an unknown kind.
            raise TypeError(f"QuantizerError kind must be one of {', '.join(sorted(KINDS))}; got {kind!r}")
        super().__init__(message)
        self.message = message
        self.field = field
        self.kind: ErrorKind = kind

    def message_calling(self, name: str) -> str:
        """The message with its subject, ``field``, called ``name`` (e.g. the service calls ``x`` "vectors").

        Only the leading name is replaced, which every message starts with; the message is returned as is
        when there is no field."""
        if self.field is None:
            return self.message
        subject, rest = self.message[: len(self.field)], self.message[len(self.field) :]
        if subject != self.field or (rest and rest[0] not in " :"):
            return self.message  # not led by its field: nothing to rename rather than a wrong word
        return name + rest

    def __reduce__(self):
        # field and kind are keyword-only, which the default BaseException pickling (cls(*args)) drops.
        return (_rebuild, (type(self), self.message, self.field, self.kind))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, field={self.field!r}, kind={self.kind!r})"


def _rebuild(cls: type[QuantizerError], message: str, field: str | None, kind: ErrorKind) -> QuantizerError:
    return cls(message, field=field, kind=kind)
