"""The image pipeline: smart-resize grids, patch layout, the HF and DALI backends, backend selection."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from prism_mcore.data import images as images_module
from prism_mcore.data.errors import IMAGE_TOO_SMALL, IMAGE_UNREADABLE, DataError
from prism_mcore.data.images import (
    DaliImageProcessor,
    HFImageProcessor,
    ImageConfig,
    ImageGeometry,
    ImageReadLimits,
    ImageSourceError,
    build_image_processor,
    dali_available,
    fetch_image_url,
    read_image_file,
)
from prism_mcore.data.readers import RecordReader, open_warmup, parse_warmup_row
from tests.http_support import serving


@pytest.mark.parametrize(
    ("config", "height", "width", "grid"),
    [
        # round(70/32)*32 = 64, round(100/32)*32 = 96: inside [1024, 16384] pixels -> 4x6 patches of 16.
        (ImageConfig(), 70, 100, (1, 4, 6)),
        # 900x1200 is over 16384 pixels: scale sqrt(900*1200/16384) = 8.119, floor(110.9/32)*32 = 96,
        # floor(147.8/32)*32 = 128.
        (ImageConfig(), 900, 1200, (1, 6, 8)),
        # 40x40 rounds to 32x32 = 1024 pixels, under min_pixels 4096: scale 1.6, ceil(64/32)*32 = 64.
        (ImageConfig(min_pixels=4096), 40, 40, (1, 4, 4)),
        # long side 1200 -> 560 first: int(900*560/1200) = 420; round(420/32) = 13, round(17.5) = 18 (to even).
        (ImageConfig(max_long_side=560, max_pixels=560 * 560), 900, 1200, (1, 26, 36)),
    ],
)
def test_grid_follows_smart_resize(
    hf_image_processor: Qwen2VLImageProcessorPil,
    make_image: Callable[..., bytes],
    config: ImageConfig,
    height: int,
    width: int,
    grid: tuple[int, int, int],
) -> None:
    geometry = ImageGeometry.from_processor(hf_image_processor, config)
    assert geometry.grid_thw(height, width) == grid
    inputs = HFImageProcessor(hf_image_processor, config)([make_image(width, height)])
    assert inputs.image_grid_thw.tolist() == [list(grid)]
    assert inputs.pixel_values.shape == (grid[1] * grid[2], 3 * 2 * 16 * 16)


def test_hf_backend_equals_pil_bicubic_and_patchify(
    hf_image_processor: Qwen2VLImageProcessorPil, make_image: Callable[..., bytes]
) -> None:
    """Two images through the backend equal a plain reference: PIL bicubic to the grid, (x/255 - 0.5)/0.5, then
    `ImageGeometry.patchify`: so our patch order is the processor's."""
    config = ImageConfig()
    backend = HFImageProcessor(hf_image_processor, config)
    files = [make_image(100, 70, seed=1), make_image(64, 150, "JPEG", seed=2)]
    inputs = backend(files)
    expected = []
    for data in files:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        height, width = backend.geometry.resized_size(image.height, image.width)
        resized = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
        normalised = torch.from_numpy((resized / 255.0 - 0.5) / 0.5).permute(2, 0, 1)
        expected.append(backend.geometry.patchify(normalised))
    torch.testing.assert_close(inputs.pixel_values, torch.cat(expected), atol=1e-6, rtol=0)
    assert inputs.image_grid_thw.tolist() == [[1, 4, 6], [1, 10, 4]]


def test_long_side_shrink_uses_lanczos_before_the_processor(
    hf_image_processor: Qwen2VLImageProcessorPil, make_image: Callable[..., bytes]
) -> None:
    config = ImageConfig(max_long_side=60)
    data = make_image(150, 90)
    inputs = HFImageProcessor(hf_image_processor, config)([data])
    # 150x90 -> 60x36 (int(90 * 60 / 150) = 36), which the processor then rounds to 64x32.
    shrunk = Image.open(io.BytesIO(data)).convert("RGB").resize((60, 36), Image.Resampling.LANCZOS)
    reference = hf_image_processor(images=[shrunk], min_pixels=1024, max_pixels=128 * 128, return_tensors="pt")
    torch.testing.assert_close(inputs.pixel_values, reference["pixel_values"])
    assert inputs.image_grid_thw.tolist() == [[1, 2, 4]]


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install 'prism_mcore[dali]')")
@pytest.mark.parametrize("max_long_side", [None, 100])
def test_dali_matches_hf_backend(
    hf_image_processor: Qwen2VLImageProcessorPil, make_image: Callable[..., bytes], max_long_side: int | None
) -> None:
    """DALI (GPU where CUDA is present, CPU-only mode otherwise) gives the HF grids exactly and the same patches
    within a few uint8 levels of resampling difference (one level is 1/127.5 = 0.0078 after normalisation)."""
    config = ImageConfig(max_long_side=max_long_side)
    files = [
        make_image(100, 70, seed=1),
        make_image(640, 300, "JPEG", seed=2),
        make_image(33, 200, seed=3),
        make_image(400, 400, "JPEG", seed=4),
    ]
    reference = HFImageProcessor(hf_image_processor, config)(files)
    dali = DaliImageProcessor(hf_image_processor, config)(files)
    assert dali.image_grid_thw.tolist() == reference.image_grid_thw.tolist()
    difference = (dali.pixel_values.cpu() - reference.pixel_values).abs()
    assert difference.max().item() < 0.05
    assert difference.mean().item() < 0.005


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install 'prism_mcore[dali]')")
def test_dali_reports_a_corrupt_image_and_keeps_working(
    hf_image_processor: Qwen2VLImageProcessorPil, make_image: Callable[..., bytes]
) -> None:
    """A PNG cut after its header passes the header checks; DALI's decoder fails on it, which is one DataError."""
    backend = DaliImageProcessor(hf_image_processor, ImageConfig())
    good = make_image(64, 64)
    with pytest.raises(DataError) as raised:
        backend([good, good[:2000]])
    # DALI does not say which image of the run failed, so the error names them all.
    assert (raised.value.reason, raised.value.field) == (IMAGE_UNREADABLE, "images[0], images[1]")
    assert backend([good]).image_grid_thw.tolist() == [[1, 4, 4]]


def test_image_errors_name_the_given_fields(
    hf_image_processor: Qwen2VLImageProcessorPil, make_image: Callable[..., bytes]
) -> None:
    backend = HFImageProcessor(hf_image_processor, ImageConfig())
    good, tiny = make_image(64, 64), make_image(20, 40)
    with pytest.raises(DataError) as raised:
        backend([good, tiny])
    assert (raised.value.reason, raised.value.field) == (IMAGE_TOO_SMALL, "images[1]")  # the default names
    with pytest.raises(DataError) as raised:
        backend([good, tiny], ["pictures[0]", "pictures[1]"])
    assert raised.value.field == "pictures[1]"
    with pytest.raises(ValueError, match="1 field names for 2 images"):
        backend([good, tiny], ["image"])


def test_dali_requested_without_dali_is_one_clear_error(
    hf_image_processor: Qwen2VLImageProcessorPil, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images_module, "dali_available", lambda: False)
    with pytest.raises(ImportError) as raised:
        build_image_processor(hf_image_processor, ImageConfig(backend="dali"))
    message = str(raised.value)
    assert "\n" not in message
    assert "image_backend='dali' needs NVIDIA DALI" in message and "prism_mcore[dali]" in message


def test_auto_backend_is_hf_without_cuda(
    hf_image_processor: Qwen2VLImageProcessorPil, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert isinstance(build_image_processor(hf_image_processor, ImageConfig(backend="auto")), HFImageProcessor)


# --- bounded reading of image files and URLs ---------------------------------------------------------------------


def _warmup_row(tmp_path: Path, image: str) -> Path:
    data = tmp_path / "warmup.jsonl"
    row = {"prompt": "What is shown?", "image": image, "teacher_response": "a cat", "student_response": "a dog"}
    data.write_text("\n" + json.dumps(row) + "\n")  # the row is on line 1
    return data


@pytest.mark.parametrize("kind", ["device", "fifo", "folder"])
def test_image_paths_must_be_regular_files(tmp_path: Path, kind: str) -> None:
    """/dev/zero would be read without end and a FIFO would block the read forever: both are refused at once,
    before a byte is read, with file, row and field named."""
    path = {"device": Path("/dev/zero"), "fifo": tmp_path / "image.png", "folder": tmp_path / "images"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    described = {"device": "device or special file", "fifo": "FIFO", "folder": "folder"}[kind]
    reader = open_warmup(_warmup_row(tmp_path, str(path)))
    started = time.monotonic()
    with pytest.raises(DataError) as refused:
        reader[0]
    assert time.monotonic() - started < 5.0
    assert str(refused.value) == (
        f"{tmp_path / 'warmup.jsonl'}, row 1, field 'image': image path {path} is a {described}, not a regular file "
        "[image_missing]"
    )


def test_image_files_are_read_up_to_the_byte_limit(tmp_path: Path) -> None:
    (tmp_path / "image.png").write_bytes(b"x" * 1000)
    assert read_image_file(tmp_path / "image.png", max_bytes=1000) == b"x" * 1000
    with pytest.raises(ImageSourceError, match="is larger than the 999-byte limit"):
        read_image_file(tmp_path / "image.png", max_bytes=999)
    reader = RecordReader(
        _warmup_row(tmp_path, "image.png"), parse_warmup_row, image_limits=ImageReadLimits(max_bytes=999)
    )
    with pytest.raises(DataError, match=r"row 1, field 'image': image file .* larger than the 999-byte limit"):
        reader[0]


class _ImageHandler(BaseHTTPRequestHandler):
    """Serves 2000 bytes: `/trickle` one byte every 0.1 s (each read is quick, the whole takes 200 s), `/` at once;
    `/big` declares more than the limit, `/unsized` declares no length (the body ends when the connection does)."""

    def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
        self.send_response(200)
        if self.path != "/unsized":
            self.send_header("Content-Length", str(10**9 if self.path == "/big" else 2000))
        self.end_headers()
        try:
            if self.path == "/trickle":
                for _ in range(2000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif self.path in ("/", "/unsized"):
                self.wfile.write(b"x" * 2000)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the http.server signature)
        pass


@pytest.fixture
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    server.daemon_threads = True
    with serving(server) as base_url:
        yield base_url


def test_url_fetches_have_a_total_deadline_and_a_byte_limit(image_server: str, tmp_path: Path) -> None:
    assert fetch_image_url(f"{image_server}/", max_bytes=2000, deadline_s=5.0) == b"x" * 2000
    started = time.monotonic()
    with pytest.raises(ImageSourceError, match=r"/trickle did not arrive within 1.5 s \(data.image_url_deadline_s\)"):
        fetch_image_url(f"{image_server}/trickle", deadline_s=1.5)
    assert time.monotonic() - started < 3.0
    with pytest.raises(ImageSourceError, match="is 1000000000 bytes, over the 1999-byte limit"):
        fetch_image_url(f"{image_server}/big", max_bytes=1999)
    with pytest.raises(ImageSourceError, match="is 2000 bytes, over the 1999-byte limit"):
        fetch_image_url(f"{image_server}/", max_bytes=1999)
    with pytest.raises(ImageSourceError, match="/unsized is larger than the 1999-byte limit"):
        fetch_image_url(f"{image_server}/unsized", max_bytes=1999)
    reader = RecordReader(
        _warmup_row(tmp_path, f"{image_server}/trickle"),
        parse_warmup_row,
        image_limits=ImageReadLimits(url_deadline_s=1.0),
    )
    started = time.monotonic()
    with pytest.raises(DataError, match=r"row 1, field 'image': .*/trickle did not arrive within 1 s"):
        reader[0]
    assert time.monotonic() - started < 2.5
