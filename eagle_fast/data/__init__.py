"""Data: image decoding, templates, tokenization, datasets."""
