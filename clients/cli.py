"""The ``isoquant`` command (also ``python -m clients``).

    isoquant quantize IN.npy|IN.safetensors -o CODES.safetensors [--variant full] [--bits 3] [--seed N]
    isoquant dequantize CODES.safetensors [-o OUT.npy|OUT.safetensors] [--reference IN.npy] [--dtype float32]
    isoquant info
    isoquant bench [--op quantize] [--concurrency 4] [--batch 256] [--dim 128] [--requests N] [--duration S]

Common options (before or after the sub-command): --url (default $ISOQUANT_URL or
http://127.0.0.1:8000), --api-key (default $ISOQUANT_API_KEY), --timeout, --retries, --format.

Exit codes: 0 success; 1 the server refused or failed the request (or, for bench, some requests
failed); 2 bad usage or an unreadable input file; 3 the server could not be reached; 130 interrupted.
Failures print one line on stderr: ``isoquant: error: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from clients._codec import PackedCodes, load_array, save_array
from clients.client import IsoQuantClient, default_url
from clients.errors import IsoQuantError, TransportError
from isoquant_format import VARIANTS

EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own code for usage errors)
        self.exit(EXIT_USAGE, f"isoquant: error: {message} (see isoquant {self.prog.split()[-1]} --help)\n"
                  if " " in self.prog else f"isoquant: error: {message} (see isoquant --help)\n")


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options every sub-command takes; on the sub-parsers they default to SUPPRESS so that a value given
    before the sub-command is not overwritten."""

    def d(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--url", default=d(None), help="server address (default: $ISOQUANT_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=d(None), help="API key (default: $ISOQUANT_API_KEY)")
    parser.add_argument("--timeout", type=float, default=d(60.0), help="seconds per request (default 60)")
    parser.add_argument("--retries", type=int, default=d(5), help="retries on 429/503 (default 5)")
    parser.add_argument("--format", choices=("safetensors", "json"), default=d("safetensors"),
                        help="wire format (default safetensors)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="isoquant", description="Client of the IsoQuant vector quantization service.",
                     epilog="Exit codes: 0 ok, 1 server error, 2 usage/input error, 3 server unreachable.")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{quantize,dequantize,info,bench}",
                                parser_class=_Parser)

    q = sub.add_parser("quantize", help="vectors file -> codes file (safetensors container)")
    q.add_argument("input", help="vectors [..., dim]: .npy (no pickle) or .safetensors")
    q.add_argument("-o", "--output", required=True, help="codes file to write (.safetensors)")
    q.add_argument("--tensor", help="tensor to read from a .safetensors input (default: the only one, or 'vectors')")
    q.add_argument("--variant", default="full", help=f"one of {', '.join(VARIANTS)} (default full)")
    q.add_argument("--bits", type=int, default=3, help="bits per coordinate (default 3)")
    q.add_argument("--seed", type=int, default=None, help="rotation seed (default: the server's default seed)")
    _common(q, suppress=True)

    d = sub.add_parser("dequantize", help="codes file -> vectors file; error statistics with --reference")
    d.add_argument("input", help="codes file (.safetensors, as written by isoquant quantize or /quantize)")
    d.add_argument("-o", "--output", help="reconstruction to write (.npy or .safetensors)")
    d.add_argument("--reference", help="original vectors (.npy or .safetensors) to compare against")
    d.add_argument("--tensor", help="tensor to read from a .safetensors reference")
    d.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="output dtype (default float32)")
    _common(d, suppress=True)

    i = sub.add_parser("info", help="print GET /info as JSON")
    _common(i, suppress=True)

    b = sub.add_parser("bench", help="load generator: throughput, latency percentiles, counts by status")
    b.add_argument("--op", choices=("quantize", "dequantize"), default="quantize")
    b.add_argument("--variant", default="full")
    b.add_argument("--bits", type=int, default=3)
    b.add_argument("--seed", type=int, default=None)
    b.add_argument("--dim", type=int, default=128)
    b.add_argument("--batch", type=int, default=256, help="vectors per request (default 256)")
    b.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    b.add_argument("--concurrency", "-c", type=int, default=4, help="requests in flight (default 4)")
    b.add_argument("--requests", "-n", type=int, default=None, help="stop after this many requests")
    b.add_argument("--duration", "-d", type=float, default=None,
                   help="stop after this many seconds (default 10 when --requests is not given)")
    bar = b.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="draw the progress bar on stderr (default: when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    b.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    _common(b, suppress=True)
    return parser


def _client(args: argparse.Namespace) -> IsoQuantClient:
    return IsoQuantClient(args.url or default_url(), args.api_key, args.timeout, format=args.format,
                          max_retries=args.retries)


def cmd_quantize(args: argparse.Namespace) -> int:
    x = load_array(args.input, args.tensor)
    with _client(args) as client:
        packed = client.quantize(x, variant=args.variant, bits=args.bits, seed=args.seed)
    packed.save(args.output)
    print(f"quantized {packed.n_vectors} vectors of dim {packed.dim} ({x.dtype}, shape {list(x.shape)}) with "
          f"{packed.variant}/{packed.bits} bits, seed {packed.seed}: {args.output}, {packed.nbytes} bytes of codes "
          f"and norms, ratio {packed.compression_ratio:.2f}, fingerprint {packed.fingerprint}")
    return EXIT_OK


def cmd_dequantize(args: argparse.Namespace) -> int:
    try:
        packed = PackedCodes.load(args.input)
    except OSError as exc:
        raise ValueError(f"{args.input}: {exc.strerror or exc}") from None
    reference = load_array(args.reference, args.tensor) if args.reference else None
    with _client(args) as client:
        result = client.dequantize(packed, reference, dtype=args.dtype)
    vectors, stats = result if reference is not None else (result, None)
    if args.output:
        save_array(args.output, vectors, metadata={k: str(v) for k, v in packed.descriptor().items()})
    where = f": {args.output}" if args.output else " (not written: no -o)"
    print(f"dequantized {packed.n_vectors} vectors of dim {packed.dim} ({args.dtype}, shape {list(vectors.shape)})"
          f"{where}")
    if stats is not None:
        print(f"mse                  {stats.mse:.6g}")
        print(f"mean relative error  {stats.mean_relative_error:.6g}")
        print(f"max relative error   {stats.max_relative_error:.6g}")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.info(), indent=2))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from clients.bench import BenchConfig, main_sync

    duration = args.duration if args.duration is not None or args.requests is not None else 10.0
    cfg = BenchConfig(url=args.url or default_url(), api_key=args.api_key or os.environ.get("ISOQUANT_API_KEY"),
                      op=args.op, variant=args.variant, dim=args.dim, bits=args.bits, seed=args.seed,
                      batch=args.batch, dtype=args.dtype, concurrency=args.concurrency, requests=args.requests,
                      duration=duration, format=args.format, timeout=args.timeout)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    report = main_sync(cfg, progress)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    if report.failed:
        print(f"isoquant: error: {report.failed} of {report.requests} requests failed "
              f"({', '.join(f'{k}: {v}' for k, v in sorted(report.by_status.items()))})", file=sys.stderr)
        return EXIT_SERVER
    return EXIT_OK


COMMANDS = {"quantize": cmd_quantize, "dequantize": cmd_dequantize, "info": cmd_info, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (and ``sys.exit``s with it when run as a
    script)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, its line already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except TransportError as exc:
        return _fail(EXIT_UNREACHABLE, f"cannot reach the server: {exc}")
    except IsoQuantError as exc:
        return _fail(EXIT_SERVER, str(exc))
    except BrokenPipeError:  # e.g. `isoquant info | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at the interpreter's exit flush
        return EXIT_OK
    except (ValueError, TypeError, OSError) as exc:
        return _fail(EXIT_USAGE, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")


def _fail(code: int, message: str) -> int:
    print(f"isoquant: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console()
