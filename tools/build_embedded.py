"""Build the embedded default (tokenizer, processor, tiny policy and discriminator, synthetic data) into the cache.

    python tools/build_embedded.py            # build if missing, else report the existing build
    python tools/build_embedded.py --force    # rebuild
    python tools/build_embedded.py --out DIR  # build into DIR instead of <cache>/embedded/<format version>

Runs offline on CPU in seconds. `prism_mcore.data.embedded.ensure_embedded()` does the same on first use.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import fields
from pathlib import Path

from prism_mcore.data.embedded import default_root, ensure_embedded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {default_root()})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    assets = ensure_embedded(args.out, force=args.force)
    manifest = assets.manifest()
    print(f"embedded default {manifest['format_version']} at {assets.root} ({time.perf_counter() - start:.1f} s)")
    print(f"  vocabulary: {manifest['vocab_size']} tokens; splits: {manifest['sizes']}")
    for field in fields(assets):
        print(f"  {field.name:22s} {getattr(assets, field.name)}")


if __name__ == "__main__":
    main()
