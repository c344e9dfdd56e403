"""``sed-fast cache list|size|clear``: the caches under ``SED_FAST_CACHE_DIR`` (see
:mod:`sed_fast.cache.inventory`).

Exit code: 0 done; 1 some entry could not be removed; 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional, Sequence

from ..base.envvars import cache_root
from . import inventory

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_PROG = "sed-fast cache"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="List, size or clear the caches sed_fast keeps under its cache root "
                                "(SED_FAST_CACHE_DIR, default ~/.cache/sed_fast): text embeddings, autotune "
                                "choices, the just-in-time CUDA extension build. Only files these caches "
                                "wrote are listed or removed. Exit code 0: done; 1: something could not be "
                                "removed; 2: usage error.")
    commands = parser.add_subparsers(dest="action", metavar="{list,size,clear}")
    listing = commands.add_parser("list", help="each cache's folder and entries (text entries name their class)")
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    sizing = commands.add_parser("size", help="bytes and entries of each cache, and in all")
    sizing.add_argument("--json", action="store_true", help="print one JSON object")
    clearing = commands.add_parser("clear", help="remove cache entries (default: of every cache)")
    for kind, what in (("text", "text embeddings"), ("autotune", "autotune choices"),
                       ("extension", "the just-in-time CUDA extension build")):
        clearing.add_argument(f"--{kind}", action="store_true", help=f"clear {what}")
    clearing.add_argument("--all", action="store_true", help="clear every cache (the default)")
    clearing.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    return parser


def _bytes(count: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _entry_record(entry: inventory.Entry) -> dict:
    record = {"path": str(entry.path), "bytes": entry.size,
              "modified": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(entry.mtime)), "what": entry.what}
    if not entry.removable:
        record["kept_because"] = entry.why_kept
    return record


def _cache_record(cache: inventory.Cache, entries: bool) -> dict:
    record = {"folder": str(cache.folder), "entries": len(cache.entries), "bytes": cache.size}
    if cache.note:
        record["note"] = cache.note
    if entries:
        record["files"] = [_entry_record(entry) for entry in cache.entries]
    return record


def _heading(cache: inventory.Cache) -> str:
    note = f" ({cache.note})" if cache.note else ""
    return (f"{cache.kind:<10} {len(cache.entries):>6} entries {_bytes(cache.size):>10}  "
            f"{cache.folder}{note}")


def _list(as_json: bool) -> int:
    caches = inventory.find_caches(describe=True)
    if as_json:
        print(json.dumps({"cache_root": str(cache_root()),
                          "caches": {cache.kind: _cache_record(cache, True) for cache in caches}}, indent=1))
        return EXIT_OK
    print(f"cache root: {cache_root()}")
    for cache in caches:
        print(_heading(cache))
        for entry in cache.entries:
            kept = f"  [kept by clear: {entry.why_kept}]" if not entry.removable else ""
            print(f"    {_bytes(entry.size):>10}  {entry.path.name}  {entry.what}{kept}")
    return EXIT_OK


def _size(as_json: bool) -> int:
    caches = inventory.find_caches()
    total = sum(cache.size for cache in caches)
    if as_json:
        print(json.dumps({"cache_root": str(cache_root()), "bytes": total,
                          "caches": {cache.kind: _cache_record(cache, False) for cache in caches}}, indent=1))
        return EXIT_OK
    for cache in caches:
        print(_heading(cache))
    print(f"{'total':<10} {sum(len(c.entries) for c in caches):>6} entries {_bytes(total):>10}  "
          f"({total} bytes)")
    return EXIT_OK


def _clear(kinds: List[str], dry_run: bool) -> int:
    caches = inventory.find_caches(kinds)
    result = inventory.clear(caches, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for cache in caches:
        removed = [entry for entry in result.removed if entry in cache.entries]
        size = sum(entry.size for entry in removed)
        print(f"{cache.kind}: {verb} {len(removed)} file(s), {_bytes(size)} ({size} bytes) from {cache.folder}")
    for entry in result.kept:
        print(f"kept {entry.path}: {entry.why_kept}")
    for entry, why in result.failed:
        print(f"{_PROG}: error: could not remove {entry.path}: {why}", file=sys.stderr)
    print(f"in all: {verb} {len(result.removed)} file(s), {_bytes(result.removed_bytes)} "
          f"({result.removed_bytes} bytes)")
    if result.failed:
        print(f"{_PROG}: {len(result.failed)} file(s) could not be removed: check their permissions and "
              "run the command again", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_OK if exit_.code in (0, None) else EXIT_USAGE
    if args.action is None:
        parser.print_usage(sys.stderr)
        print(f"{_PROG}: error: say what to do: list, size or clear (see `{_PROG} --help`)", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.action == "list":
            return _list(args.json)
        if args.action == "size":
            return _size(args.json)
        kinds = [kind for kind in inventory.KINDS if getattr(args, kind)]
        return _clear(list(inventory.KINDS) if args.all or not kinds else kinds, args.dry_run)
    except ValueError as error:  # a bad SED_FAST_CACHE_DIR / SED_FAST_CUDA_BUILD_DIR value
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
