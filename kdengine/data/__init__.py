"""LLaVA-format data: records, templates, collator, synthetic scenes and tokenizer."""

from .collator import LlavaCollator
from .dataset import LlavaDataset, SkippedSample, build_dataset
from .images import expand_to_square, process_images
from .records import BadSample, BadSampleSummary, Record, Turn, load_records
from .sampler import LengthGroupedBatchSampler
from .synth import synthesize
from .templates import IGNORE_INDEX, TEMPLATES, tokenize_record, truncate
from .tokenizer import CHATML_TEMPLATE, IMAGE_TOKEN, train_tokenizer

__all__ = [
    "BadSample",
    "BadSampleSummary",
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "LengthGroupedBatchSampler",
    "LlavaCollator",
    "LlavaDataset",
    "Record",
    "SkippedSample",
    "TEMPLATES",
    "Turn",
    "build_dataset",
    "expand_to_square",
    "load_records",
    "process_images",
    "synthesize",
    "tokenize_record",
    "train_tokenizer",
    "truncate",
]
