"""An image_url's bytes: data: URLs decoded with bounds, local files only inside the allowed
folder, nothing from the network; each refusal names the field."""

from __future__ import annotations

import base64
import os

import pytest

from pdserve.media.errors import MediaError
from pdserve.media.image_source import image_bytes
from pdserve.media.limits import MediaLimits
from tests.media.vision_helpers import data_url

FIELD = "messages[0].content[1].image_url.url"
LIMITS = MediaLimits(max_image_bytes=1000)


def refused(url: str, limits: MediaLimits = LIMITS) -> str:
    with pytest.raises(MediaError) as info:
        image_bytes(url, limits, FIELD)
    assert info.value.param == FIELD
    return str(info.value)


def test_a_data_url_gives_its_bytes():
    assert image_bytes(data_url(b"\x89PNG..."), LIMITS, FIELD) == b"\x89PNG..."


def test_bad_base64_is_refused():
    assert "base64" in refused("data:image/png;base64,abc$%^")


def test_a_non_image_media_type_is_refused():
    assert "not supported" in refused(data_url(b"x", "text/html"))


def test_a_data_url_without_base64_is_refused():
    assert "data:<image type>;base64" in refused("data:image/png,rawbytes")


def test_an_image_over_the_byte_limit_is_refused_before_decoding():
    assert "--max-image-bytes" in refused(data_url(b"x" * 1001))
    assert "--max-image-bytes" in refused("data:image/png;base64," + "A" * 10**6)


@pytest.mark.parametrize("url", ["http://example.com/a.png", "HTTPS://example.com/a.png"])
def test_network_urls_are_never_fetched(url):
    assert "network fetches are off" in refused(url)


def test_other_schemes_are_refused():
    assert "data: URL" in refused("ftp://example.com/a.png")


def test_local_files_are_off_without_the_flag(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    assert "--allowed-local-media-path" in refused(f"file://{tmp_path}/a.png")


def allowed(tmp_path) -> MediaLimits:
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"secret")
    return MediaLimits(max_image_bytes=1000, allowed_local_media_path=str(root))


def test_a_file_inside_the_allowed_folder_is_read(tmp_path):
    limits = allowed(tmp_path)
    assert image_bytes(f"file://{tmp_path}/media/a.png", limits, FIELD) == b"png"


def test_a_path_climbing_out_of_the_folder_is_refused(tmp_path):
    limits = allowed(tmp_path)
    assert "not inside" in refused(f"file://{tmp_path}/media/../secret.png", limits)
    assert "not inside" in refused(f"file://{tmp_path}/media/%2E%2E/secret.png", limits)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    limits = allowed(tmp_path)
    os.symlink(tmp_path / "secret.png", tmp_path / "media" / "link.png")
    assert "not inside" in refused(f"file://{tmp_path}/media/link.png", limits)


def test_a_file_url_naming_another_host_is_refused(tmp_path):
    limits = allowed(tmp_path)
    assert "this host" in refused(f"file://example.com{tmp_path}/media/a.png", limits)


def test_a_large_local_file_is_refused(tmp_path):
    limits = allowed(tmp_path)
    (tmp_path / "media" / "big.png").write_bytes(b"x" * 1001)
    assert "--max-image-bytes" in refused(f"file://{tmp_path}/media/big.png", limits)


def test_base64_with_whitespace_is_refused_not_guessed():
    payload = base64.b64encode(b"abcdef").decode()
    assert "base64" in refused(f"data:image/png;base64,{payload[:4]} {payload[4:]}")
