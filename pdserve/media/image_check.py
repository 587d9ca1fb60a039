"""The engine's check that a prompt's image tokens and its images agree: every image-token
position gets exactly one embedding row, so a count that differs would shift them all."""

from __future__ import annotations

from pdserve.media.vision_spec import VisionSpec
from pdserve.multimodal import ImageInput


def check_image_tokens(prompt_token_ids: list[int], images: list[ImageInput],
                       vision: VisionSpec | None) -> None:
    """Raise ValueError (a message for the user) unless the model takes images (if there
    are any), the prompt holds exactly the image tokens its images fill, and each image's
    pixels are the tiles the model's encoder takes."""
    if vision is None:
        if images:
            raise ValueError("this model does not accept images")
        return
    count = prompt_token_ids.count(vision.image_token_id)
    expected = sum(image.num_tokens for image in images)
    if count != expected:
        raise ValueError(f"the prompt has {count} image tokens but its images fill "
                         f"{expected}; image tokens come only from image parts")
    for image in images:
        if image.embeddings is None:
            _check_pixels(image, vision)


def _check_pixels(image: ImageInput, vision: VisionSpec) -> None:
    shape = tuple(image.pixel_values.shape)
    tile = vision.tile_size
    if len(shape) != 4 or shape[1:] != (3, tile, tile) or shape[0] < 1:
        raise ValueError(f"an image's pixel_values are {list(shape)}, not [tiles, 3, {tile}, "
                         f"{tile}]")
    if image.num_tokens != shape[0] * vision.image_seq_len:
        raise ValueError(f"an image of {shape[0]} tiles fills {shape[0]} x "
                         f"{vision.image_seq_len} tokens, not {image.num_tokens}")
