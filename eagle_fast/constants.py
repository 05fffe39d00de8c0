"""Token conventions shared by every layer (LLaVA's): a leaf module, imported by data and model alike.

IMAGE_TOKEN_INDEX marks where an image goes in `input_ids` (its features replace it); IGNORE_INDEX
is the label of a position the loss skips (prompts, image rows, padding).
"""

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
