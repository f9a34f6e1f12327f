"""Peak memory of a stage's prompts: `python tools/bench_prompt_memory.py [--prompts 20000] [--work DIR]`.

Writes a synthetic alignment parquet of N prompts (the embedded default's prompts and images, repeated) into a
scratch folder, loads it with `stages.context.load_prompts` as a stage does on one rank, builds the prompts of
`--steps` steps of `--per-step` prompts, and prints the process's peak RSS. Run it on two versions of the code (e.g.
with PYTHONPATH set to each checkout) to compare: an eager build holds every prompt's token ids and processed image
(O(file)); a per-step build holds one batch.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq


def write_prompts(path: Path, count: int, source: Path) -> None:
    rows = pq.read_table(source).to_pylist()
    copies = []
    for index in range(count):
        row = dict(rows[index % len(rows)])
        row["extra_info"] = {**(row.get("extra_info") or {}), "index": index}
        copies.append(row)
    pq.write_table(pa.Table.from_pylist(copies), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--per-step", type=int, default=8)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args()

    from prism_mcore.config import load_recipe
    from prism_mcore.data.batching import batch_for_step
    from prism_mcore.data.embedded import ensure_embedded
    from prism_mcore.data.embedded.tokenizer import load_tokenizer
    from prism_mcore.data.images import ImageConfig, build_image_processor, load_image_processor
    from prism_mcore.data.samples import LengthLimits, SampleBuilder
    from prism_mcore.stages.context import load_prompts

    assets = ensure_embedded()
    work = Path(args.work or tempfile.mkdtemp(prefix="prompt_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"align_{args.prompts}.parquet"
    if not data.exists():
        write_prompts(data, args.prompts, Path(assets.align_path))
    config = load_recipe("embedded")
    images = build_image_processor(load_image_processor(assets.processor_path), ImageConfig(backend="hf"))
    limits = LengthLimits(max_prompt_length=config.data.max_prompt_length)
    ctx = SimpleNamespace(
        config=config,
        tokenizer=load_tokenizer(assets.processor_path),
        builder=SimpleNamespace(images=images, limits=limits),
        data_stats={},
        is_main=True,
        env=SimpleNamespace(world_size=1, rank=0),
    )
    ctx.builder = SampleBuilder(ctx.tokenizer, images, limits)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.time()
    prompts = load_prompts(ctx, str(data), "align", require_teacher=True)
    loaded = time.time() - start
    for step in range(args.steps):
        batch = batch_for_step(prompts, step, args.per_step, config.run.seed)
        assert len(batch) == args.per_step
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.prompts} prompts: peak RSS {peak:.0f} MiB (before loading {baseline:.0f} MiB), "
        f"loaded in {loaded:.0f} s, {len(prompts)} usable"
    )


if __name__ == "__main__":
    main()
