"""An image's placeholder expanded into the model's image-token text, as the SmolVLM and
Idefics3 processors write it: each split tile behind a fake token and its <row_r_col_c>
marker, rows ended by a newline, then the global image between fake tokens."""

from __future__ import annotations

from pdserve.media.vision_spec import VisionSpec


def image_prompt_text(spec: VisionSpec, rows: int, cols: int) -> str:
    """The text that stands for one image of `rows` x `cols` split tiles (0 x 0: the
    global image alone), with spec.image_seq_len image tokens per tile."""
    tokens = spec.image_token * spec.image_seq_len
    fake = spec.fake_image_token
    global_image = f"{fake}{spec.global_image_token}{tokens}{fake}"
    if rows == 0 and cols == 0:
        return global_image
    grid = "".join(
        "".join(f"{fake}<row_{r + 1}_col_{c + 1}>{tokens}" for c in range(cols)) + "\n"
        for r in range(rows))
    return f"{grid}\n{global_image}"


def num_image_tokens(spec: VisionSpec, rows: int, cols: int) -> int:
    """Image-token positions of one image: image_seq_len per tile, the global one included."""
    return spec.image_seq_len * (rows * cols + 1)
