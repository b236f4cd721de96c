"""The ``isoquant`` command (also ``python -m clients``).

    isoquant quantize IN.npy|IN.safetensors -o CODES.safetensors [--variant full] [--bits 3] [--distortion]
    isoquant dequantize CODES.safetensors [-o OUT.npy|OUT.safetensors] [--reference IN.npy] [--dtype float16]
    isoquant inspect CODES.safetensors|VECTORS.npy [--json]
    isoquant info
    isoquant bench [--op quantize] [--concurrency 4 | --rate R] [--batch 256] [--dim 128] [--requests N]
                   [--duration S]

Common options (before or after the sub-command): --url (default $ISOQUANT_URL or
http://127.0.0.1:8000), --api-key (default $ISOQUANT_API_KEY), --timeout, --retries, --format, --wait.

Exit codes: 0 success; 1 the server refused or failed the request (or, for bench, some requests
failed); 2 bad usage or an unreadable input file; 3 the server could not be reached (bench: it stopped
answering during the run); 130 interrupted. Failures print one line on stderr: ``isoquant: error: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata

from clients._codec import NotCodesError, PackedCodes, check_writable, load_array, save_array
from clients.client import IsoQuantClient, default_url, output_dtype
from clients.errors import IsoQuantError, TransportError, UnauthorizedError
from isoquant_format import FORMAT_VERSION, VARIANTS

EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# The numbers are docs/EVALUATION.md's (bench/eval_real.py on all-MiniLM-L6-v2, bench/eval_llm.py on
# SmolLM2-135M); the ratios are bytes (float16 input, codes plus a float32 norm).
CHOOSING = """\
which variant and bits:
  embeddings (sentence, image, retrieval vectors): --variant full, the default: on a real model's sentence
    embeddings (all-MiniLM-L6-v2, d = 384) its recall@10 equals a dense rotation's (0.871 / 0.920 / 0.955
    against 0.870 / 0.920 / 0.954 at --bits 2 / 3 / 4), at 4 multiply-adds a coordinate. Dim 768, float16:
      --bits 2: ratio 7.8     --bits 3: ratio 5.3 (default)     --bits 4: ratio 4.0     --bits 5: ratio 3.2
  LLM KV caches (keys and values per head): --variant hadamard (head dim a power of two) or dense; the 4-D
    block rotations raise perplexity 4-6x more on keys with outlier channels (docs/EVALUATION.md). For a
    transformers model use kernels.hf.IsoQuantCache with a preset (kv-4.5, kv-3.5, kv-2.5: GET /info lists
    their recipes) rather than quantizing tensors by hand.
  check a choice on your own vectors: --distortion (mean/max relative error, cosine similarity)."""


def _version() -> str:
    try:
        return metadata.version("isoquant-service")
    except metadata.PackageNotFoundError:
        return "unknown"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own code for usage errors)
        self.exit(EXIT_USAGE, f"isoquant: error: {message} (see isoquant {self.prog.split()[-1]} --help)\n"
                  if " " in self.prog else f"isoquant: error: {message} (see isoquant --help)\n")


def _common(parser: argparse.ArgumentParser, suppress: bool, retries: bool = True) -> None:
    """Options every sub-command takes; on the sub-parsers they default to SUPPRESS so that a value given
    before the sub-command is not overwritten."""

    def d(value):
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--url", default=d(None), help="server address (default: $ISOQUANT_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=d(None), help="API key (default: $ISOQUANT_API_KEY)")
    parser.add_argument("--timeout", type=float, default=d(60.0), help="seconds per request (default 60)")
    if retries:
        parser.add_argument("--retries", type=int, default=d(5),
                            help="retries on 429/503 (default 5; bench never retries)")
    parser.add_argument("--format", choices=("safetensors", "json"), default=d("safetensors"),
                        help="wire format (default safetensors)")
    parser.add_argument("--wait", type=float, default=d(0.0), metavar="SECONDS",
                        help="first wait up to this long for the server to be ready (it may be starting or warming "
                        "up; default 0: do not wait)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="isoquant", description="Client of the IsoQuant vector quantization service.",
                     epilog="Exit codes: 0 ok, 1 server error, 2 usage/input error, 3 server unreachable.")
    parser.add_argument("--version", action="version",
                        version=f"isoquant {_version()} (code format {FORMAT_VERSION})")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{quantize,dequantize,inspect,info,bench}",
                                parser_class=_Parser)

    q = sub.add_parser("quantize", help="vectors file -> codes file (safetensors container)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CHOOSING)
    q.add_argument("input", help="vectors [..., dim]: .npy (no pickle) or .safetensors")
    q.add_argument("-o", "--output", required=True,
                   help="codes file to write: a .safetensors container (its folder must exist)")
    q.add_argument("--tensor", help="tensor to read from a .safetensors input (default: the only one, or 'vectors')")
    q.add_argument("--variant", default="full",
                   help=f"rotation: {', '.join(VARIANTS)} (default full: embeddings; KV caches: hadamard, see below)")
    q.add_argument("--bits", type=int, default=3, help="bits per coordinate, 1-8 (default 3)")
    q.add_argument("--seed", type=int, default=None, help="rotation seed (default: the server's default seed)")
    q.add_argument("--distortion", action="store_true",
                   help="also have the server decode the codes and print the error and cosine similarity against "
                   "the input (stored in the codes file; isoquant inspect shows it)")
    _common(q, suppress=True)

    d = sub.add_parser("dequantize", help="codes file -> vectors file; error statistics with --reference")
    d.add_argument("input", help="codes file (.safetensors, as written by isoquant quantize or /quantize)")
    d.add_argument("-o", "--output", help="reconstruction to write (.npy or .safetensors; its folder must exist)")
    d.add_argument("--reference", help="original vectors (.npy or .safetensors) to compare against")
    d.add_argument("--tensor", help="tensor to read from a .safetensors reference")
    d.add_argument("--dtype", choices=("float32", "float16"), default=None,
                   help="output dtype (default: the input's, which the codes record; bfloat16 comes back float32)")
    _common(d, suppress=True)

    n = sub.add_parser("inspect", help="describe a codes file (or a vectors file) without the server")
    n.add_argument("input", help="codes file (.safetensors), or a vectors file (.npy, .safetensors)")
    n.add_argument("--tensor", help="tensor to describe in a .safetensors vectors file")
    n.add_argument("--json", action="store_true", help="print the description as JSON")

    i = sub.add_parser("info", help="print GET /info as JSON")
    _common(i, suppress=True)

    b = sub.add_parser("bench", help="load generator: failures, throughput, latency percentiles, counts by status",
                       description="Sends the same pre-built request until --requests are sent or --duration "
                       "passes (whichever first; the report says which), or the server stops answering. "
                       "Closed loop by default (--concurrency requests in flight); --rate sends at a fixed rate.")
    b.add_argument("--op", choices=("quantize", "dequantize"), default="quantize",
                   help="route to load: quantize sends vectors, dequantize their codes (default quantize)")
    b.add_argument("--variant", default="full", help=f"one of {', '.join(VARIANTS)} (default full)")
    b.add_argument("--bits", type=int, default=3, help="bits per coordinate (default 3)")
    b.add_argument("--seed", type=int, default=None, help="rotation seed (default: the server's default seed)")
    b.add_argument("--dim", type=int, default=128, help="vector dimension (default 128)")
    b.add_argument("--batch", type=int, default=256, help="vectors per request (default 256)")
    b.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the vectors sent (default float32)")
    b.add_argument("--concurrency", "-c", type=int, default=None,
                   help="closed loop: requests in flight (default 4); with --rate: the most in flight (default 64)")
    b.add_argument("--rate", type=float, default=None, metavar="R",
                   help="fixed-rate mode: start R requests a second whatever the answers (latency then counts "
                   "from each request's scheduled start)")
    b.add_argument("--requests", "-n", type=int, default=None, help="stop after sending this many requests")
    b.add_argument("--duration", "-d", type=float, default=None,
                   help="stop after this many seconds (default 10 when --requests is not given)")
    b.add_argument("--max-connection-failures", type=int, default=10, metavar="N",
                   help="stop after N consecutive requests without an answer: the server stopped (default 10; "
                   "0: never)")
    bar = b.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="draw the progress line on stderr (default: when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line")
    b.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    _common(b, suppress=True, retries=False)
    return parser


def _client(args: argparse.Namespace) -> IsoQuantClient:
    client = IsoQuantClient(args.url or default_url(), args.api_key, args.timeout, format=args.format,
                            max_retries=getattr(args, "retries", 5))
    if args.wait > 0:
        try:
            client.wait_ready(args.wait)
        except BaseException:
            client.close()
            raise
    return client


def _codes_output(path: str) -> None:
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: codes are written as a safetensors container; name the output *.safetensors")
    check_writable(path)


def _vectors_output(path: str) -> None:
    if not path.endswith((".npy", ".safetensors")):
        raise ValueError(f"{path}: unknown file type; use .npy or .safetensors")
    check_writable(path)


def _quality_lines(stats) -> list[str]:
    lines = [f"mse                  {stats.mse:.6g}",
             f"mean relative error  {stats.mean_relative_error:.6g}",
             f"max relative error   {stats.max_relative_error:.6g}"]
    if stats.mean_cosine_similarity is not None:
        lines += [f"mean cosine similarity  {stats.mean_cosine_similarity:.6g}",
                  f"min cosine similarity   {stats.min_cosine_similarity:.6g}"]
    return lines


def _ratio_text(packed: PackedCodes, source_dtype: str) -> str:
    if packed.compression_ratio is None:
        return "ratio unknown"
    text = f"ratio {packed.compression_ratio:.2f} against the {source_dtype} input ({packed.bytes_in:,} bytes)"
    if source_dtype != packed.dtype:  # float64, integers: sent (and restored) as float32
        sent = packed.n_vectors * packed.dim * 4
        text += f"; it was sent as {packed.dtype} (ratio {sent / packed.nbytes:.2f} against that)"
    return text


def cmd_quantize(args: argparse.Namespace) -> int:
    _codes_output(args.output)  # before the server does the work
    x = load_array(args.input, args.tensor)
    with _client(args) as client:
        packed = client.quantize(x, variant=args.variant, bits=args.bits, seed=args.seed,
                                 return_distortion=args.distortion)
    packed.save(args.output)
    print(f"quantized {packed.n_vectors} vectors of dim {packed.dim} ({x.dtype}, shape {list(x.shape)}) with "
          f"{packed.variant}/{packed.bits} bits, seed {packed.seed}: {args.output}, {packed.nbytes:,} bytes of codes "
          f"and norms, {_ratio_text(packed, str(x.dtype))}, fingerprint {packed.fingerprint}")
    if packed.distortion is not None:
        print("\n".join(_quality_lines(packed.distortion)))
    return EXIT_OK


def cmd_dequantize(args: argparse.Namespace) -> int:
    if args.output:
        _vectors_output(args.output)  # before the server does the work
    try:
        packed = PackedCodes.load(args.input)
    except OSError as exc:
        raise ValueError(f"{args.input}: {exc.strerror or exc}") from None
    reference = load_array(args.reference, args.tensor) if args.reference else None
    dtype = output_dtype(packed, args.dtype)
    with _client(args) as client:
        result = client.dequantize(packed, reference, dtype=dtype)
    vectors, stats = result if reference is not None else (result, None)
    if args.output:
        meta = {**{k: str(v) for k, v in packed.descriptor().items()}, "dtype": str(vectors.dtype)}
        save_array(args.output, vectors, metadata=meta)
    where = f": {args.output}" if args.output else " (not written: no -o)"
    if args.dtype:
        origin = f"{dtype} as asked"
    elif dtype == packed.dtype:
        origin = f"{dtype}, as the codes record"
    else:
        origin = f"{dtype}: the codes record {packed.dtype}, which numpy cannot hold"
    print(f"dequantized {packed.n_vectors} vectors of dim {packed.dim} ({origin}; shape {list(vectors.shape)})"
          f"{where}")
    if stats is not None:
        print("\n".join(_quality_lines(stats)))
    return EXIT_OK


def _describe(path: str, tensor: str | None) -> dict:
    """What ``path`` holds: codes (their descriptor, sizes and recorded quality) or vectors."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    try:
        packed = PackedCodes.from_bytes(data, source=path)
    except NotCodesError:
        x = load_array(path, tensor)
        return {"file": path, "kind": "vectors", "shape": list(x.shape), "dtype": str(x.dtype), "bytes": int(x.nbytes),
                "hint": f"isoquant quantize {path} -o CODES.safetensors"}
    out = {"file": path, "kind": "codes", "format_version": packed.format_version, "variant": packed.variant,
           "dim": packed.dim, "bits": packed.bits, "seed": packed.seed, "fingerprint": packed.fingerprint,
           "vectors": packed.n_vectors, "shape": list(packed.shape), "dtype": packed.dtype,
           "code_bytes_per_vector": packed.code_bytes, "bytes": packed.nbytes, "file_bytes": len(data),
           "bytes_in": packed.bytes_in, "compression_ratio": packed.compression_ratio,
           "distortion": packed.distortion.as_dict() if packed.distortion is not None else None}
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    d = _describe(args.input, args.tensor)
    if args.json:
        print(json.dumps(d, indent=2))
        return EXIT_OK
    if d["kind"] == "vectors":
        print(f"{d['file']}: vectors, not codes: {d['dtype']} {d['shape']}, {d['bytes']:,} bytes; compress them with "
              f"{d['hint']}")
        return EXIT_OK
    ratio = f", ratio {d['compression_ratio']:.2f} against {d['bytes_in']:,} bytes of input" if d["bytes_in"] else ""
    rows = [
        ("file", f"{d['file']}: IsoQuant codes, format {d['format_version']}"),
        ("variant", d["variant"]),
        ("dim", d["dim"]),
        ("bits", d["bits"]),
        ("seed", d["seed"]),
        ("fingerprint", d["fingerprint"]),
        ("vectors", f"{d['vectors']:,} (shape {d['shape']})"),
        ("dtype", f"{d['dtype']} (isoquant dequantize restores it)"),
        ("bytes", f"{d['bytes']:,} of codes and norms ({d['code_bytes_per_vector']} + 4 a vector; the file "
                  f"{d['file_bytes']:,}){ratio}"),
    ]
    stats = d["distortion"]
    if stats is None:
        rows.append(("quality", "not recorded (isoquant quantize --distortion records it)"))
    else:
        quality = (f"mean relative error {stats['mean_relative_error']:.4g} (max {stats['max_relative_error']:.4g}), "
                   f"mse {stats['mse']:.4g}")
        if stats["mean_cosine_similarity"] is not None:
            quality += (f", cosine similarity {stats['mean_cosine_similarity']:.4f} "
                        f"(min {stats['min_cosine_similarity']:.4f})")
        rows.append(("quality", quality))
    print("\n".join(f"{name:<12} {value}" for name, value in rows))
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.info(), indent=2))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from clients.bench import STOP_CONNECTION, BenchConfig, main_sync

    duration = args.duration if args.duration is not None or args.requests is not None else 10.0
    concurrency = args.concurrency if args.concurrency is not None else (64 if args.rate else 4)
    cfg = BenchConfig(url=args.url or default_url(), api_key=args.api_key or os.environ.get("ISOQUANT_API_KEY"),
                      op=args.op, variant=args.variant, dim=args.dim, bits=args.bits, seed=args.seed,
                      batch=args.batch, dtype=args.dtype, concurrency=concurrency, requests=args.requests,
                      duration=duration, format=args.format, timeout=args.timeout, rate=args.rate,
                      max_connection_failures=args.max_connection_failures)
    cfg.validate()
    if args.wait > 0:
        _client(args).close()
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    report = main_sync(cfg, progress)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    if report.stopped_by == STOP_CONNECTION:
        print(f"isoquant: error: the server stopped answering: {report.stop_detail}; {report.failed} of "
              f"{report.requests} requests failed", file=sys.stderr)
        return EXIT_UNREACHABLE
    if report.failed:
        print(f"isoquant: error: {report.failed} of {report.requests} requests failed ({report.failed_share:.1%}: "
              f"{', '.join(f'{k}: {v}' for k, v in sorted(report.by_status.items()))})", file=sys.stderr)
        return EXIT_SERVER
    return EXIT_OK


COMMANDS = {"quantize": cmd_quantize, "dequantize": cmd_dequantize, "inspect": cmd_inspect, "info": cmd_info,
            "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (and ``sys.exit``s with it when run as a
    script)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2, its line already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except TransportError as exc:
        return _fail(EXIT_UNREACHABLE, f"cannot reach the server: {exc}")
    except UnauthorizedError as exc:
        return _fail(EXIT_SERVER, f"{exc} (give the server's key with --api-key or $ISOQUANT_API_KEY)")
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
