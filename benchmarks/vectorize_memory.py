"""Benchmark: peak memory of ``rsseg vectorize`` does not grow with the raster.

    python benchmarks/vectorize_memory.py [--sizes 4096 16384] [--width W] [--speckle P] [--simplify S]

For each size, writes a class raster (the land-cover-like map of ``benchmarks/vectorize.py``, or
independent pixels with ``--speckle P``; ``--width W``: rasters of ``size`` rows and ``W`` columns,
to grow the height alone) and runs ``rsseg vectorize`` on it in a fresh process,
reading that process's peak resident set size (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``
of an intermediate process that runs nothing else). ``--bare`` also runs a bare
``vectorize_to_file`` process (no CLI: the CLI's imports are a fixed cost every run pays, see
``*_imports_mb``). Target: the largest size within 1.5x of the smallest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vectorize import write_class_raster, write_speckle_raster  # noqa: E402

_PEAK = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
# What `rsseg vectorize` imports (not rsseg.inference.run: that is predict's, with torch).
_CLI_IMPORTS = "import rsseg.cli, rsseg.commands.infer, rsseg.api, rsseg.inference.mosaic, rsseg.inference.vectorize"
_BARE_IMPORTS = "import rsseg.inference.vectorize"
_BARE = "import sys; from rsseg.inference.vectorize import vectorize_to_file; vectorize_to_file(*sys.argv[1:3])"


def peak_rss_mb(command: list[str]) -> float:
    """Peak RSS (MiB) of ``command`` run in a fresh process (Linux: ru_maxrss in KiB)."""
    out = subprocess.run([sys.executable, "-c", _PEAK, *command], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--width", type=int, default=None,
                        help="columns of every raster (default: square); growing the height alone")
    parser.add_argument("--speckle", type=float, default=None, metavar="P")
    parser.add_argument("--simplify", type=float, default=None, help="as rsseg vectorize --simplify")
    parser.add_argument("--bare", action="store_true", help="also measure a bare vectorize_to_file process")
    args = parser.parse_args()
    rsseg = [sys.executable, "-m", "rsseg.cli"]  # as the rsseg entry point, in this interpreter
    result = {"benchmark": "vectorize_memory", "width": args.width, "speckle": args.speckle,
              "simplify": args.simplify,
              "cli_imports_mb": round(peak_rss_mb([sys.executable, "-c", _CLI_IMPORTS]), 1)}
    if args.bare:
        result["bare_imports_mb"] = round(peak_rss_mb([sys.executable, "-c", _BARE_IMPORTS]), 1)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            raster = Path(tmp) / f"classes{size}.tif"
            if args.speckle is None:
                write_class_raster(raster, size, width=args.width)
            elif args.width is None:
                write_speckle_raster(raster, size, args.speckle)
            else:
                raise SystemExit("--width is for the land-cover-like map only")
            out = Path(tmp) / f"v{size}.gpkg"
            command = [*rsseg, "vectorize", str(raster), "-o", str(out), "-q"]
            if args.simplify is not None:
                command += ["--simplify", str(args.simplify)]
            t0 = time.perf_counter()
            result[f"peak_mb_{size}"] = round(peak_rss_mb(command), 1)
            result[f"seconds_{size}"] = round(time.perf_counter() - t0, 1)
            out.unlink()
            if args.bare:
                if args.simplify is not None:
                    raise SystemExit("--bare measures the default simplification only")
                t0 = time.perf_counter()
                result[f"bare_peak_mb_{size}"] = round(peak_rss_mb([sys.executable, "-c", _BARE, str(raster), str(out)]), 1)
                result[f"bare_seconds_{size}"] = round(time.perf_counter() - t0, 1)
                out.unlink()
            raster.unlink()
    first, last = args.sizes[0], args.sizes[-1]
    result["ratio"] = round(result[f"peak_mb_{last}"] / result[f"peak_mb_{first}"], 3)
    if args.bare:
        result["bare_ratio"] = round(result[f"bare_peak_mb_{last}"] / result[f"bare_peak_mb_{first}"], 3)
    result["target"] = 1.5
    print(json.dumps(result))


if __name__ == "__main__":
    main()
