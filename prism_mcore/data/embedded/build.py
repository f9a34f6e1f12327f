"""Build the embedded default once, locally and deterministically, and find it again: `ensure_embedded()`.

The embedded default is everything a run needs with no downloads: the tokenizer and processor, a tiny Qwen3-VL
policy, a tiny upcycled Qwen3-VL-MoE discriminator, and the synthetic task's SFT, warmup, alignment, RL, validation
and test files. It lives in `<cache>/embedded/<FORMAT_VERSION>/`, where `<cache>` is `$PRISM_CACHE` if set, else
the repository's `.cache/` (git-ignored), else `~/.cache/prism_mcore`:

    <root>/processor/       tokenizer + chat template + image/video processor configs
    <root>/policy/          Qwen3VLForConditionalGeneration checkpoint (random init), with the processor files
    <root>/discriminator/   Qwen3VLMoeForConditionalGeneration checkpoint (upcycled), with the processor files
    <root>/data/            sft.jsonl + dataset_info.json + images/sft/, warmup.jsonl + images/warmup/,
                            align.parquet, rl.parquet, val.parquet, test.parquet
    <root>/manifest.json    format version, seed, split sizes, token ids and the sha256 of every file

A build writes into a temporary sibling folder and renames it into place only when complete, so a killed build never
leaves a partial folder behind; an exclusive file lock next to the folder makes concurrent callers (every rank of a
torchrun job) wait for one builder and then reuse its result. Every build from the same seed and sizes produces the
same bytes. Bump FORMAT_VERSION whenever the output changes, so stale caches are not reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prism_mcore.data.embedded.formats import (
    DATASET_INFO_FILE,
    SFT_FILE,
    WARMUP_FILE,
    write_prompts,
    write_sft,
    write_warmup,
)
from prism_mcore.data.embedded.models import save_discriminator, save_policy
from prism_mcore.data.embedded.processor import save_processor
from prism_mcore.data.embedded.task import TaskSizes, generate_task
from prism_mcore.data.embedded.tokenizer import token_ids, train_tokenizer
from prism_mcore.data.prompts import SYSTEM_PROMPT, user_prompt

FORMAT_VERSION = "v1"
CACHE_ENV = "PRISM_CACHE"
DEFAULT_SEED = 1234
TOKENIZER_SAMPLE_SIZE = 1000  # conversations the BPE is trained on, independent of the build's split sizes
MANIFEST_FILE = "manifest.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedAssets:
    """Paths of a built embedded default. Field names match `DataConfig`/`ModelConfig` where those have a field."""

    root: Path
    processor_path: Path  # tokenizer + processor folder (`load_tokenizer` / `load_processor`)
    policy_path: Path
    discriminator_path: Path
    data_dir: Path
    sft_path: Path  # LLaMA-Factory sharegpt JSONL; image paths are relative to data_dir
    sft_dataset_info_path: Path
    warmup_path: Path
    align_path: Path
    rl_path: Path
    val_path: Path
    test_path: Path
    manifest_path: Path

    @classmethod
    def at(cls, root: str | Path) -> EmbeddedAssets:
        root = Path(root)
        data = root / "data"
        return cls(
            root=root,
            processor_path=root / "processor",
            policy_path=root / "policy",
            discriminator_path=root / "discriminator",
            data_dir=data,
            sft_path=data / SFT_FILE,
            sft_dataset_info_path=data / DATASET_INFO_FILE,
            warmup_path=data / WARMUP_FILE,
            align_path=data / "align.parquet",
            rl_path=data / "rl.parquet",
            val_path=data / "val.parquet",
            test_path=data / "test.parquet",
            manifest_path=root / MANIFEST_FILE,
        )

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text())


def default_root() -> Path:
    """`<cache>/embedded/<FORMAT_VERSION>`; see the module docstring for `<cache>`."""
    if os.environ.get(CACHE_ENV):
        cache = Path(os.environ[CACHE_ENV])
    else:
        repo = Path(__file__).resolve().parents[3]
        # An editable install runs from the repository (it has setup.py); an installed wheel does not.
        cache = repo / ".cache" if (repo / "setup.py").is_file() else Path.home() / ".cache" / "prism_mcore"
    return cache / "embedded" / FORMAT_VERSION


def is_built(root: Path, sizes: TaskSizes, seed: int) -> bool:
    """Whether `root` holds a complete build of this format, seed and sizes.

    Builds only ever rename complete folders into place, so a manifest means a complete folder.
    """
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    return (manifest["format_version"], manifest["seed"], manifest["sizes"]) == (FORMAT_VERSION, seed, asdict(sizes))


def ensure_embedded(
    root: str | Path | None = None,
    force: bool = False,
    sizes: TaskSizes | None = None,
    seed: int = DEFAULT_SEED,
) -> EmbeddedAssets:
    """The embedded default at `root` (default: `default_root()`), built first unless a matching build is there.

    `force` rebuilds anyway; `sizes` (default: `TaskSizes()`) and `seed` choose the split sizes and the seed of the
    task, the tokenizer and the model weights. Safe to call from many processes at once: one builds, the others wait
    and reuse its build.
    """
    root = Path(root) if root is not None else default_root()
    sizes = sizes or TaskSizes()
    if not force and is_built(root, sizes, seed):
        return EmbeddedAssets.at(root)
    with _exclusive(root):
        if force or not is_built(root, sizes, seed):  # another process may have built it while this one waited
            _build_locked(root, sizes, seed)
    return EmbeddedAssets.at(root)


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<root>.lock`; every builder of `root` holds it while building."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_locked(root: Path, sizes: TaskSizes, seed: int) -> None:
    # Holding the lock, no other build of `root` is running: leftovers of killed builds can go.
    for stale in [*root.parent.glob(f".{root.name}.building-*"), root.parent / f".{root.name}.retired"]:
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other checkout file
    try:
        _write_all(staging, sizes, seed)
        if root.exists():
            retired = root.parent / f".{root.name}.retired"
            root.rename(retired)
            staging.rename(root)
            shutil.rmtree(retired)
        else:
            staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _tokenizer_corpus(seed: int) -> list[str]:
    """Conversations of the task as the model reads them (roles, system prompt, question, responses)."""
    no_heldout = TaskSizes(sft=TOKENIZER_SAMPLE_SIZE, warmup=0, align=0, rl=0, val=0, test=0)
    corpus = []
    for example in generate_task(no_heldout, seed)["sft"]:
        prompt = f"system\n{SYSTEM_PROMPT}\nuser\n{user_prompt(example.question.text)}\nassistant\n"
        corpus += [prompt + example.teacher.text, example.demonstration.text]
    return corpus


def _write_all(out: Path, sizes: TaskSizes, seed: int) -> None:
    start = time.perf_counter()

    def step(message: str) -> None:
        logger.info("embedded default: %s (%.1f s)", message, time.perf_counter() - start)

    splits = generate_task(sizes, seed)
    step(f"generated the task: {', '.join(f'{n} {len(e)}' for n, e in splits.items())}")
    tokenizer = train_tokenizer(_tokenizer_corpus(seed))
    save_processor(tokenizer, out / "processor")
    step(f"trained the tokenizer ({len(tokenizer)} tokens)")
    save_policy(tokenizer, out / "policy", seed)
    save_discriminator(tokenizer, out / "discriminator", seed + 1)
    step("saved the policy and the upcycled discriminator")

    assets = EmbeddedAssets.at(out)
    assets.data_dir.mkdir()
    write_sft(splits["sft"], assets.data_dir)
    write_warmup(splits["warmup"], assets.data_dir)
    write_prompts(splits["align"], assets.align_path, with_teacher=True)
    write_prompts(splits["rl"], assets.rl_path, with_teacher=False)
    write_prompts(splits["val"], assets.val_path, with_teacher=True)
    write_prompts(splits["test"], assets.test_path, with_teacher=True)
    step("wrote the data files")

    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "sizes": asdict(sizes),
        "vocab_size": len(tokenizer),
        "token_ids": token_ids(tokenizer),
        "files": {
            path.relative_to(out).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(out.rglob("*"))
            if path.is_file()
        },
    }
    # Written last: its presence marks the folder complete.
    assets.manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
