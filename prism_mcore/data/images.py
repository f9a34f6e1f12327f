"""The image pipeline: encoded image files -> Qwen3-VL `pixel_values` and `image_grid_thw` (`ImageInputs`).

Two interchangeable backends produce the same layout, `[sum_i t_i*h_i*w_i, C*T*P*P]` patches plus one `(t, h, w)` row
per image (PRISM_SPEC §7: images go through the policy's processor):

- `hf`: transformers' Qwen2-VL/Qwen3-VL image processor, always its PIL implementation (bicubic), so the result is the
  same on every machine, with or without torchvision.
- `dali`: an NVIDIA DALI pipeline (decode -> resize to the processor's grid by the same smart-resize rule -> normalise)
  followed by the same patchify. It decodes and resizes on the GPU (`mixed` decoder) when CUDA is present and runs
  DALI's CPU-only mode (`device_id=None`) otherwise. Its resampling differs from PIL's by a few uint8 levels, so it
  matches `hf` within a tolerance, not exactly.

`image_backend="auto"` takes DALI when it is installed and CUDA is present (on CPU it is no faster than PIL) and `hf`
otherwise. Before either backend runs, every image's header is checked: unreadable files, images smaller than one
merged patch, over `max_input_pixels`, or with an aspect ratio the processor rejects each raise one `DataError`,
naming the image by the field it came from (`images[i]` unless the caller names the fields: a warmup row's `image`,
a renamed SFT column).

Encoded files are read with bounds (`read_image_file`, `fetch_image_url`): a local path must name a regular file (not
a FIFO, device or folder) of at most `max_image_bytes` (default 32 MiB), and an http(s) fetch must deliver at most that
many bytes within a total deadline (default 30 s), however slowly the bytes trickle in. `open_image` bounds the bytes
again (images that arrive as bytes) and the pixels before anything is decoded.

The warmup stage additionally shrinks images so the long side is at most 560 (PRISM_SPEC §2.5, §8.6):
`ImageConfig.max_long_side` does that first resize, with Lanczos and truncated sizes as the reference does.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import math
import os
import socket
import stat
import threading
import time
import urllib.parse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from prism_mcore.config.schema import ImageBackend
from prism_mcore.data.errors import (
    IMAGE_ASPECT_RATIO,
    IMAGE_TOO_LARGE,
    IMAGE_TOO_SMALL,
    IMAGE_UNREADABLE,
    DataError,
)
from prism_mcore.record import ImageInputs

# Qwen's smart resize refuses images whose long side is more than 200 times the short side.
MAX_ASPECT_RATIO = 200.0
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024**2  # one encoded image file
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # width * height, checked from the header before decoding
DEFAULT_URL_DEADLINE_S = 30.0  # a whole http(s) image fetch, connection to last byte
_MAX_REDIRECTS = 5


@dataclass(frozen=True)
class ImageReadLimits:
    """Bounds on reading one image file or URL (the data readers; `data.max_image_mb`, `data.image_url_deadline_s`)."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    url_deadline_s: float = DEFAULT_URL_DEADLINE_S

    @classmethod
    def from_megabytes(cls, max_image_mb: float, url_deadline_s: float) -> ImageReadLimits:
        return cls(max_bytes=int(max_image_mb * 1024**2), url_deadline_s=url_deadline_s)


class ImageSourceError(ValueError):
    """An image file or URL that cannot be read within the bounds; the message says why (the caller names the
    file, row and field)."""


def read_image_file(path: str | Path, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the regular file at `path`, at most `max_bytes`; raises `ImageSourceError` for anything else.

    The file is opened without blocking and checked with `fstat` on the open descriptor, so a FIFO cannot hang the
    read and a device such as /dev/zero or a folder is refused before a byte is read.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise ImageSourceError(f"cannot open image file {path} ({error.strerror})") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        kind = "folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "device or special file"
        raise ImageSourceError(f"image path {path} is a {kind}, not a regular file")
    with os.fdopen(descriptor, "rb") as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageSourceError(f"image file {path} is larger than the {max_bytes}-byte limit (data.max_image_mb)")
    return data


def fetch_image_url(
    url: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, deadline_s: float = DEFAULT_URL_DEADLINE_S
) -> bytes:
    """The body of an http(s) image URL (following up to 5 redirects): at most `max_bytes`, all of it within
    `deadline_s` seconds of the call; raises `ImageSourceError` otherwise.

    The deadline covers the whole fetch, not each read: a timer shuts the socket down when it expires, which wakes
    any read in progress, so a server that trickles its headers or body one byte at a time is cut off on time.
    """
    deadline = time.monotonic() + deadline_s
    for _ in range(_MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageSourceError(f"cannot fetch {url}: not an http(s) URL")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageSourceError(f"{url} did not arrive within {deadline_s:g} s (data.image_url_deadline_s)")
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(parts.hostname, parts.port, timeout=remaining)
        expired = threading.Event()
        timer: threading.Timer | None = None
        try:
            connection.connect()  # bounded by the connection's timeout, the time left
            # The response may take the socket over (and the connection forget it), so the timer holds it itself.
            timer = threading.Timer(remaining, _cut_off, (connection.sock, expired))
            timer.daemon = True
            timer.start()
            connection.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")))
            response = connection.getresponse()
            location = response.getheader("Location")
            if response.status in (301, 302, 303, 307, 308) and location:
                url = urllib.parse.urljoin(url, location)
                continue
            if response.status != 200:
                raise ImageSourceError(f"cannot fetch {url} (HTTP {response.status} {response.reason})")
            data = _bounded_body(response, url, max_bytes)
            if not expired.is_set():  # a body cut off by the deadline may look complete when it has no length
                return data
            raise TimeoutError
        except (OSError, http.client.HTTPException) as error:
            if expired.is_set():
                raise ImageSourceError(
                    f"{url} did not arrive within {deadline_s:g} s (data.image_url_deadline_s)"
                ) from None
            raise ImageSourceError(f"cannot fetch {url} ({error})") from None
        finally:
            if timer is not None:
                timer.cancel()
            connection.close()
    raise ImageSourceError(f"cannot fetch {url}: more than {_MAX_REDIRECTS} redirects")


def _cut_off(sock: socket.socket, expired: threading.Event) -> None:
    """End a fetch whose deadline passed: shutting the socket down wakes the read that waits on it."""
    expired.set()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _bounded_body(response: http.client.HTTPResponse, url: str, max_bytes: int) -> bytes:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ImageSourceError(f"{url} is {declared} bytes, over the {max_bytes}-byte limit (data.max_image_mb)")
    data = response.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageSourceError(f"{url} is larger than the {max_bytes}-byte limit (data.max_image_mb)")
    return data


@dataclass
class ImageConfig:
    """How images are turned into patches. `None` pixel bounds keep the processor's own configuration."""

    backend: ImageBackend = "auto"
    min_pixels: int | None = None  # smart-resize lower bound on the resized area
    max_pixels: int | None = None  # smart-resize upper bound on the resized area (warmup: 560*560)
    max_long_side: int | None = None  # shrink first so that max(height, width) <= this (warmup: 560)
    max_input_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are rejected before decoding (decompression bombs)
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # larger encoded files are rejected before opening


@dataclass(frozen=True)
class ImageGeometry:
    """The processor settings both backends share, and the size rule they resize by."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    max_long_side: int | None = None

    @classmethod
    def from_processor(cls, processor: Qwen2VLImageProcessorPil, config: ImageConfig) -> ImageGeometry:
        return cls(
            patch_size=processor.patch_size,
            merge_size=processor.merge_size,
            temporal_patch_size=processor.temporal_patch_size,
            min_pixels=config.min_pixels or processor.size["shortest_edge"],
            max_pixels=config.max_pixels or processor.size["longest_edge"],
            image_mean=tuple(processor.image_mean),
            image_std=tuple(processor.image_std),
            max_long_side=config.max_long_side,
        )

    @property
    def factor(self) -> int:
        """Side of one merged patch in pixels: resized sides are multiples of it, and images must be at least it."""
        return self.patch_size * self.merge_size

    def prescaled_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after the optional long-side shrink; the reference truncates the scaled sides (`int(w * ratio)`)."""
        if self.max_long_side is None or max(height, width) <= self.max_long_side:
            return height, width
        ratio = self.max_long_side / max(height, width)
        return int(height * ratio), int(width * ratio)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Qwen's smart resize: sides rounded to multiples of `factor`, area brought within [min_pixels, max_pixels]
        by one common scale, keeping the aspect ratio as closely as those constraints allow."""
        factor = self.factor
        new_height = round(height / factor) * factor
        new_width = round(width / factor) * factor
        if new_height * new_width > self.max_pixels:
            scale = math.sqrt(height * width / self.max_pixels)
            new_height = max(factor, math.floor(height / scale / factor) * factor)
            new_width = max(factor, math.floor(width / scale / factor) * factor)
        elif new_height * new_width < self.min_pixels:
            scale = math.sqrt(self.min_pixels / (height * width))
            new_height = math.ceil(height * scale / factor) * factor
            new_width = math.ceil(width * scale / factor) * factor
        return new_height, new_width

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """The `(t, h, w)` patch grid of an image of this (original) size."""
        resized_height, resized_width = self.resized_size(*self.prescaled_size(height, width))
        return 1, resized_height // self.patch_size, resized_width // self.patch_size

    def num_image_tokens(self, grid_thw: Sequence[int]) -> int:
        """`<|image_pad|>` tokens one image takes in the text: t*h*w patches, merged merge_size**2 at a time."""
        t, h, w = grid_thw
        return t * h * w // self.merge_size**2

    def patchify(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised `[C, H, W]` image -> `[grid_h*grid_w, C*T*P*P]` patches in the processor's order.

        The image is repeated `temporal_patch_size` times (a still image is a one-step video); patches are ordered
        by merge window (row-major), then within the window, so that the vision tower's merger takes consecutive
        rows; each row is laid out channel, time, patch row, patch column.
        """
        channels, height, width = image.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        frames = image.unsqueeze(0).expand(t, channels, height, width)
        blocks = frames.reshape(t, channels, grid_h // m, m, p, grid_w // m, m, p)
        blocks = blocks.permute(2, 5, 3, 6, 1, 0, 4, 7)
        return blocks.reshape(grid_h * grid_w, channels * t * p * p)


def load_image_processor(path: str | Path) -> Qwen2VLImageProcessorPil:
    """The PIL image processor from a checkpoint folder's `preprocessor_config.json`.

    `AutoImageProcessor` needs torchvision in transformers 5.x (unusable with the CPU torch, see the DALI notes) and
    would pick a different resize implementation where torchvision exists; the PIL class is the same everywhere.
    """
    return Qwen2VLImageProcessorPil.from_pretrained(str(path))


def image_fields(count: int, fields: Sequence[str] | None) -> Sequence[str]:
    """The field each of `count` images is reported under: `fields` as given, by default `images[0]`, `images[1]`..."""
    if fields is None:
        return [f"images[{index}]" for index in range(count)]
    if len(fields) != count:
        raise ValueError(f"{len(fields)} field names for {count} images")
    return fields


def open_image(data: bytes, field: str, geometry: ImageGeometry, config: ImageConfig) -> Image.Image:
    """Open (header only) and check one encoded image; returns the lazily decoded PIL image.

    Raises `DataError` naming `field` when the file is over `max_image_bytes`, is not an image, is smaller than one merged patch on a side, has
    more than `max_input_pixels`, or has an aspect ratio over 200.
    """
    if len(data) > config.max_image_bytes:
        raise DataError(
            IMAGE_TOO_LARGE,
            f"encoded image is {len(data)} bytes, over the limit of {config.max_image_bytes} bytes",
            field=field,
        )
    try:
        # PIL's own decompression-bomb check is a warning up to twice its limit; ours is the limit that counts.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise DataError(IMAGE_TOO_LARGE, str(error), field=field) from None
    except (OSError, ValueError) as error:
        raise DataError(IMAGE_UNREADABLE, f"not a readable image ({error})", field=field) from None
    width, height = image.size
    if min(width, height) < geometry.factor:
        raise DataError(
            IMAGE_TOO_SMALL,
            f"image is {width}x{height}; both sides must be at least one merged patch ({geometry.factor} pixels)",
            field=field,
        )
    if width * height > config.max_input_pixels:
        raise DataError(
            IMAGE_TOO_LARGE,
            f"image is {width}x{height} = {width * height} pixels, over max_input_pixels={config.max_input_pixels}",
            field=field,
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise DataError(
            IMAGE_ASPECT_RATIO, f"image is {width}x{height}; the aspect ratio must be at most 200", field=field
        )
    return image


class ImageProcessor(Protocol):
    """Encoded image files of one sample -> their patches. Raises `DataError` for bad images, naming the image's
    entry of `fields` (the record fields the images came from; by default `images[i]`)."""

    geometry: ImageGeometry

    def __call__(self, images: Sequence[bytes], fields: Sequence[str] | None = None) -> ImageInputs: ...


class HFImageProcessor:
    """Backend `hf`: PIL decode, the optional long-side shrink, then transformers' PIL Qwen image processor."""

    def __init__(self, processor: Qwen2VLImageProcessorPil, config: ImageConfig) -> None:
        self.processor = processor
        self.config = config
        self.geometry = ImageGeometry.from_processor(processor, config)

    def __call__(self, images: Sequence[bytes], fields: Sequence[str] | None = None) -> ImageInputs:
        decoded = []
        for data, field in zip(images, image_fields(len(images), fields), strict=True):
            image = open_image(data, field, self.geometry, self.config)
            try:
                image.load()
            except (OSError, ValueError) as error:
                raise DataError(IMAGE_UNREADABLE, f"image data is corrupt ({error})", field=field) from None
            height, width = self.geometry.prescaled_size(image.height, image.width)
            if (height, width) != (image.height, image.width):
                image = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            decoded.append(image)
        output = self.processor(
            images=decoded,
            min_pixels=self.geometry.min_pixels,
            max_pixels=self.geometry.max_pixels,
            return_tensors="pt",
        )
        return ImageInputs(pixel_values=output["pixel_values"], image_grid_thw=output["image_grid_thw"])


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliImageProcessor:
    """Backend `dali`: DALI decode and resize (GPU when CUDA is present, else DALI's CPU mode), then patchify.

    Resizing uses cubic interpolation with antialiasing, which matches PIL's bicubic within a few uint8 levels (the
    DALI default, linear, does not); EXIF orientation is ignored, as PIL and the HF processor ignore it. Outputs are
    on the device DALI ran on.
    """

    MAX_IMAGES_PER_RUN = 32  # the pipeline's batch size; longer lists run in chunks

    def __init__(self, processor: Qwen2VLImageProcessorPil, config: ImageConfig) -> None:
        self.config = config
        self.geometry = ImageGeometry.from_processor(processor, config)
        self.pipeline = self._build_pipeline()

    def _build_pipeline(self) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        geometry = self.geometry
        on_gpu = torch.cuda.is_available()
        mean = [255.0 * value for value in geometry.image_mean]
        std = [255.0 * value for value in geometry.image_std]

        @pipeline_def(
            batch_size=self.MAX_IMAGES_PER_RUN,
            num_threads=max(1, min(4, os.cpu_count() or 1)),
            device_id=torch.cuda.current_device() if on_gpu else None,
            exec_dynamic=True,
            prefetch_queue_depth=1,
        )
        def pipeline():  # type: ignore[no-untyped-def]
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            resized = fn.external_source(name="resized", dtype=types.FLOAT)
            image = fn.decoders.image(
                encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB, adjust_orientation=False
            )
            if geometry.max_long_side is not None:
                prescaled = fn.external_source(name="prescaled", dtype=types.FLOAT)
                image = fn.resize(image, size=prescaled, interp_type=types.INTERP_LANCZOS3, antialias=True)
            image = fn.resize(image, size=resized, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(image, mean=mean, std=std, output_layout="CHW", dtype=types.FLOAT)

        built = pipeline()
        built.build()
        return built

    def __call__(self, images: Sequence[bytes], fields: Sequence[str] | None = None) -> ImageInputs:
        fields = image_fields(len(images), fields)
        sizes = []
        for data, field in zip(images, fields, strict=True):
            image = open_image(data, field, self.geometry, self.config)
            sizes.append(self.geometry.prescaled_size(image.height, image.width))
        patches: list[torch.Tensor] = []
        grids: list[tuple[int, int, int]] = []
        for start in range(0, len(images), self.MAX_IMAGES_PER_RUN):
            chunk = range(start, min(start + self.MAX_IMAGES_PER_RUN, len(images)))
            resized = [self.geometry.resized_size(*sizes[i]) for i in chunk]
            # DALI sizes follow the layout's spatial order, (height, width) for HWC images.
            self.pipeline.feed_input("encoded", [np.frombuffer(images[i], dtype=np.uint8) for i in chunk])
            if self.geometry.max_long_side is not None:
                self.pipeline.feed_input("prescaled", [np.array(sizes[i], dtype=np.float32) for i in chunk])
            self.pipeline.feed_input("resized", [np.array(size, dtype=np.float32) for size in resized])
            try:
                (normalised,) = self.pipeline.run()
            except RuntimeError as error:
                # A failed run leaves the pipeline invalid (DALI says so in the error): the next sample needs a new one.
                self.pipeline = self._build_pipeline()
                # The message is the pipeline definition's traceback; the decoder's cause is its last other line.
                lines = [line for line in str(error).splitlines() if line.strip() and "no longer valid" not in line]
                message = f"DALI could not decode the images of this sample ({lines[-1].strip()})"
                # The run does not say which image failed: the error names every image of the chunk.
                raise DataError(IMAGE_UNREADABLE, message, field=", ".join(fields[i] for i in chunk)) from None
            for position, (height, width) in enumerate(resized):
                # DALI reuses its output buffers on the next run, so the patches must be a copy.
                image = torch.from_dlpack(normalised[position])
                patches.append(self.geometry.patchify(image).clone())
                grids.append((1, height // self.geometry.patch_size, width // self.geometry.patch_size))
        return ImageInputs(pixel_values=torch.cat(patches), image_grid_thw=torch.tensor(grids, dtype=torch.long))


def build_image_processor(processor: Qwen2VLImageProcessorPil, config: ImageConfig) -> ImageProcessor:
    """The backend `config.backend` names; `auto` is DALI when it is installed and CUDA is present, else `hf`."""
    backend = config.backend
    if backend == "auto":
        backend = "dali" if dali_available() and torch.cuda.is_available() else "hf"
    if backend == "hf":
        return HFImageProcessor(processor, config)
    if not dali_available():
        raise ImportError(
            "image_backend='dali' needs NVIDIA DALI, which is not installed: pip install 'prism_mcore[dali]' "
            "(CUDA 12) or 'prism_mcore[dali-cu13]' (CUDA 13), or set image_backend to 'hf' or 'auto'"
        )
    return DaliImageProcessor(processor, config)
