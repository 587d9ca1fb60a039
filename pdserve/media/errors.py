"""The one error of the media code: a client's image that cannot be taken, and why."""

from __future__ import annotations


class MediaError(ValueError):
    """Refuse the request with a 400 naming `param` (e.g. messages[0].content[1].image_url)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
