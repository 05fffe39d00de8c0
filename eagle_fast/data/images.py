"""The data layer's name for image decoding and image files: everything lives in the leaf module
eagle_fast.images (which every layer may import)."""

from eagle_fast.images import (  # noqa: F401  (re-exported)
    DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageFileError, load_image_file, resolve_image_path, to_rgb_batch,
    to_rgb_uint8)
