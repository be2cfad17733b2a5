"""LLaVA-format data: records, templates, collator, synthetic scenes and tokenizer."""
