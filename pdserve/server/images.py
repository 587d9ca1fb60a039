"""A chat request's image parts: refused at once by a text-only model, else prepared (off
the event loop) into the engine's images, each failure a 400 naming its part."""

from __future__ import annotations

from pdserve.media.errors import MediaError
from pdserve.media.image_inputs import ImagePreparer, ImageRef, PreparedImage
from pdserve.server.errors import bad_request
from pdserve.server.protocol import ChatCompletionRequest


def image_refs(req: ChatCompletionRequest) -> list[ImageRef]:
    """The request's image parts in prompt order, each with its field path."""
    return [ImageRef(part.url, part.detail, f"messages[{m}].content[{c}].image_url.url")
            for m, message in enumerate(req.messages) for c, part in message.images()]


async def prepare_images(preparer: ImagePreparer | None,
                         req: ChatCompletionRequest) -> list[PreparedImage] | None:
    """The request's images, prepared; None for a text-only model (which gets none)."""
    refs = image_refs(req)
    if preparer is None:
        if refs:
            raise bad_request("this model does not accept images", refs[0].param
                              .removesuffix(".image_url.url"))
        return None
    try:
        return await preparer.prepare(refs)
    except MediaError as exc:
        raise bad_request(str(exc), exc.param) from None
