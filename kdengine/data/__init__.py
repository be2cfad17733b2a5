"""LLaVA-format data: records, templates, collator, synthetic scenes and tokenizer.

Names load on first use (PEP 562), so the records, templates and synthetic data import without torch.
"""

from kdengine.lazy import lazy_getattr

_EXPORTS = {
    "LlavaCollator": "collator",
    "LlavaDataset": "dataset", "SkippedSample": "dataset", "build_dataset": "dataset",
    "expand_to_square": "images", "process_images": "images",
    "BadSample": "records", "BadSampleSummary": "records", "Record": "records", "Turn": "records",
    "check_image_file": "records", "load_records": "records", "precheck_records": "records",
    "LengthGroupedBatchSampler": "sampler",
    "synthesize": "synth",
    "IGNORE_INDEX": "templates", "TEMPLATES": "templates", "tokenize_record": "templates", "truncate": "templates",
    "CHATML_TEMPLATE": "tokenizer", "IMAGE_TOKEN": "tokenizer", "train_tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
