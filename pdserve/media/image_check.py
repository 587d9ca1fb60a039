"""The engine's check that a prompt's image tokens and its images agree: every image-token
position gets exactly one embedding row, so a count that differs would shift them all."""

from __future__ import annotations

from pdserve.multimodal import ImageInput


def check_image_tokens(prompt_token_ids: list[int], images: list[ImageInput],
                       image_token_id: int | None) -> None:
    """Raise ValueError (a message for the user) unless the prompt holds exactly the image
    tokens its images fill, and the model takes images if it has any."""
    if image_token_id is None:
        if images:
            raise ValueError("this model does not accept images")
        return
    count = prompt_token_ids.count(image_token_id)
    expected = sum(image.num_tokens for image in images)
    if count != expected:
        raise ValueError(f"the prompt has {count} image tokens but its images fill "
                         f"{expected}; image tokens come only from image parts")
    for image in images:
        if image.embeddings is None and image.pixel_values.dim() != 4:
            raise ValueError("an image's pixel_values must be [tiles, 3, H, W]")
