"""Data: image decoding, LLaVA-format records, templates, tokenization, datasets, batching."""

from eagle_fast.data.collate import EagleCollator, concat_images
from eagle_fast.data.dataset import REASONS, EagleDataset
from eagle_fast.data.sampler import ModalityLengthSampler, TokenBudgetBatchSampler
from eagle_fast.data.templates import TEMPLATES, get_template
from eagle_fast.data.tokenize import DataError, tokenize_conversation

__all__ = [
    "EagleCollator",
    "EagleDataset",
    "DataError",
    "ModalityLengthSampler",
    "REASONS",
    "TEMPLATES",
    "TokenBudgetBatchSampler",
    "concat_images",
    "get_template",
    "tokenize_conversation",
]
