"""Data pipelines (tokenization with `tokenizers`, MLM masking, batching). Filled by the
training issues; nothing here yet."""
