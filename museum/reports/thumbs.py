"""Image thumbnails as `<img>` tags carrying a small JPEG as a data URI.

The clean and dedup pages and the run reports' example grids show one thumbnail per item, so
each item gets its own small JPEG (a few kB) rather than one mosaic PNG: a page of 100 items
stays well under a megabyte, captions are real text that wraps, and, like every report, the
page opens with no network and no files beside it.
"""

from __future__ import annotations

import io
from pathlib import Path

from markupsafe import Markup

from museum.reports import html

THUMB = 160  # pixels on the longer side: enough to tell what a photo shows


def thumbnail_tag(path: str | Path | None, alt: str, size: int = THUMB) -> Markup:
    """`<img>` of the image at `path` scaled so its longer side is `size`, or a grey note saying why it can't be shown."""
    from PIL import Image

    from museum.data.images import ImageDecodeError, safe_open_image

    if path is None:
        return html.muted("no image")
    try:
        img = safe_open_image(path, draft=size)
    except ImageDecodeError as exc:  # a moved or broken file still yields a page
        return html.muted(exc.reason)
    scale = size / max(img.size)
    if scale < 1:
        img.thumbnail((size, size))
    elif scale > 1:  # small images (28-px sprites) fill the box too; blocky pixels stay sharper than blur
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.NEAREST if scale >= 2 else Image.BICUBIC)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=80)
    return html.image(buffer.getvalue(), "image/jpeg", alt, img.width, img.height)
