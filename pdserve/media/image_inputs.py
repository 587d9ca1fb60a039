"""A request's image parts -> the engine's ImageInputs and their prompt text, in a bounded
thread pool: decoding and preprocessing take milliseconds to a second of CPU per image and
must not stall the event loop, nor take more cores than the server was given."""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pdserve.media.errors import MediaError
from pdserve.media.idefics3_preprocess import preprocess
from pdserve.media.image_decode import decode_image
from pdserve.media.image_prompt import image_prompt_text, num_image_tokens
from pdserve.media.image_source import image_bytes
from pdserve.media.limits import MediaLimits
from pdserve.media.vision_spec import VisionSpec
from pdserve.multimodal import ImageInput

HASH_BYTES = 32


@dataclass(frozen=True)
class ImageRef:
    """One image part of a request, where it is (`param`, for the 400s)."""

    url: str
    detail: str  # "auto" | "low" | "high"
    param: str  # e.g. messages[0].content[1].image_url.url


@dataclass
class PreparedImage:
    """One image for the engine, and the text its placeholder expands into."""

    input: ImageInput
    prompt_text: str


class ImagePreparer:
    """Turns image parts into PreparedImages for one model, `limits.decode_threads` at once."""

    def __init__(self, spec: VisionSpec, limits: MediaLimits) -> None:
        self.spec = spec
        self.limits = limits
        self._pool = ThreadPoolExecutor(limits.decode_threads, "pdserve-images")

    async def prepare(self, refs: list[ImageRef]) -> list[PreparedImage]:
        """All of a request's images (in order), or the first one's MediaError."""
        if len(refs) > self.limits.max_images:
            raise MediaError(f"at most {self.limits.max_images} images per request "
                             f"(--limit-mm-per-prompt); this one has {len(refs)}", "messages")
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self._pool, self.prepare_now, ref) for ref in refs]
        try:
            return list(await asyncio.gather(*jobs))
        finally:
            for job in jobs:  # one failed: the rest are wasted work
                job.cancel()

    def prepare_now(self, ref: ImageRef) -> PreparedImage:
        """One image, in the calling thread."""
        data = image_bytes(ref.url, self.limits, ref.param)
        image = decode_image(data, self.limits, ref.param)
        split = self.spec.do_image_splitting and ref.detail != "low"
        digest = hashlib.blake2b(digest_size=HASH_BYTES)
        digest.update(f"{image.width}x{image.height}:".encode())
        digest.update(image.tobytes())
        digest.update(self.spec.settings_key(split))
        tiles = preprocess(image, self.spec, split)
        pixels = tiles.pixel_values.share_memory_()  # crosses to the engine as a handle
        num_tokens = num_image_tokens(self.spec, tiles.rows, tiles.cols)
        assert num_tokens == self.spec.image_seq_len * pixels.shape[0]
        return PreparedImage(ImageInput(digest.digest(), pixels, num_tokens),
                             image_prompt_text(self.spec, tiles.rows, tiles.cols))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
