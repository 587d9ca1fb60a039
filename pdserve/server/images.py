"""A chat request's image parts: refused at once by a text-only model, else prepared (off
the event loop) into the engine's images, each failure a 400 naming its part."""

from __future__ import annotations

from pdserve.media.errors import MediaError
from pdserve.media.image_inputs import ImagePreparer, ImageRef, PreparedImage
from pdserve.server.errors import bad_request
from pdserve.server.protocol import ChatMessage


def image_refs(messages: list[ChatMessage]) -> list[ImageRef]:
    """The messages' image parts in prompt order, each with its field path."""
    return [ImageRef(part.url, part.detail, f"messages[{m}].content[{c}].image_url.url")
            for m, message in enumerate(messages) for c, part in message.images()]


async def prepare_images(preparer: ImagePreparer | None,
                         messages: list[ChatMessage]) -> list[PreparedImage] | None:
    """The messages' images, prepared; None for a text-only model (which gets none)."""
    refs = image_refs(messages)
    if preparer is None:
        if refs:
            raise bad_request("this model does not accept images", refs[0].param
                              .removesuffix(".image_url.url"))
        return None
    try:
        return await preparer.prepare(refs)
    except MediaError as exc:
        raise bad_request(str(exc), exc.param) from None
