"""What the server must know of a vision-language model to turn images into its prompt:
the preprocessing settings and the image tokens (SmolVLM / Idefics3 family).

They come from the model folder's `preprocessor_config.json` (the image processor's
settings), `processor_config.json` (`image_seq_len`) and `config.json` (`image_token_id`),
the files transformers writes; the defaults are SmolVLM-256M's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

LANCZOS = int(Image.Resampling.LANCZOS)
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class VisionSpec:
    """Preprocessing and prompt expansion of one model's images (all sizes in pixels)."""

    image_token_id: int  # the prompt positions the engine fills with image embeddings
    image_seq_len: int = 64  # image tokens per tile (after the connector's pixel shuffle)
    tile_size: int = 512  # max_image_size.longest_edge: the vision encoder's square input
    longest_edge: int = 2048  # size.longest_edge: images are first resized to this
    do_image_splitting: bool = True  # tiles of tile_size plus a global image
    resample: int = LANCZOS
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_token: str = IMAGE_TOKEN
    fake_image_token: str = "<fake_token_around_image>"
    global_image_token: str = "<global-img>"

    @classmethod
    def from_folder(cls, folder: str | Path, image_token_id: int | None = None) -> VisionSpec:
        """The spec of a model (or processor) folder; `image_token_id` where the folder has
        no config.json naming it (a processor saved alone)."""
        folder = Path(folder)
        pre = _read_json(folder / "preprocessor_config.json")
        proc = _read_json(folder / "processor_config.json")
        config = _read_json(folder / "config.json")
        token_id = config.get("image_token_id", image_token_id)
        if token_id is None:
            raise ValueError(f"{folder}: no image_token_id in config.json")
        off = [k for k in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")
               if pre.get(k, True) is False]
        if off:  # our preprocessing always does them: refuse rather than differ silently
            raise ValueError(f"{folder}/preprocessor_config.json: {', '.join(off)} false is "
                             "not supported")
        defaults = cls(image_token_id=int(token_id))
        return cls(
            image_token_id=int(token_id),
            image_seq_len=int(proc.get("image_seq_len", defaults.image_seq_len)),
            tile_size=int(_edge(pre.get("max_image_size"), defaults.tile_size)),
            longest_edge=int(_edge(pre.get("size"), defaults.longest_edge)),
            do_image_splitting=bool(pre.get("do_image_splitting", True)),
            resample=int(pre.get("resample", LANCZOS)),
            rescale_factor=float(pre.get("rescale_factor", defaults.rescale_factor)),
            image_mean=_per_channel(pre.get("image_mean", defaults.image_mean)),
            image_std=_per_channel(pre.get("image_std", defaults.image_std)),
        )

    def settings_key(self, split: bool) -> bytes:
        """The preprocessing settings, as bytes for the content hash: the same pixels under
        other settings are another input to the encoder."""
        return repr((self.tile_size, self.longest_edge, split, self.resample,
                     self.rescale_factor, self.image_mean, self.image_std)).encode()


def is_vision_folder(folder: str | Path) -> bool:
    """A folder holding an image processor's settings."""
    return (Path(folder) / "preprocessor_config.json").is_file()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _per_channel(value: float | list[float]) -> tuple[float, float, float]:
    """A mean or std as three channels (transformers allows one number for all)."""
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    r, g, b = (float(v) for v in value)
    return r, g, b


def _edge(size: dict | None, default: int) -> int:
    return size.get("longest_edge", default) if isinstance(size, dict) else default


def vision_spec_of(model_name: str | None, model: object) -> VisionSpec | None:
    """The spec of a loaded model, None unless it encodes images. The model's side of the
    contract: `embed_images` and `image_token_id`; the settings come from its folder's
    processor files, else from the model's own `vision_spec` (a random-weight preset), else
    SmolVLM-256M's, with the tile size and rows a tile of the model's own tower
    (`config.vision`) where it has one."""
    if not hasattr(model, "embed_images"):
        return None
    token_id = int(model.image_token_id)
    if model_name and is_vision_folder(model_name):
        return dataclasses.replace(VisionSpec.from_folder(model_name, token_id),
                                   image_token_id=token_id)
    own = getattr(model, "vision_spec", None)
    if own is not None:
        return own
    spec = VisionSpec(image_token_id=token_id)
    tower = getattr(getattr(model, "config", None), "vision", None)
    if tower is not None:  # no processor settings: the tower's own tiles, not 256M's
        spec = dataclasses.replace(spec, tile_size=tower.image_size,
                                   image_seq_len=tower.tokens_per_tile)
    return spec


def tokenizer_folder_added_tokens(folder: str | Path) -> dict[str, int]:
    """The added (special) tokens of a folder's tokenizer.json, by content, without loading
    the tokenizer."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return {}
    added = json.loads(path.read_text()).get("added_tokens", [])
    return {t["content"]: int(t["id"]) for t in added}
