"""Words: the vocabulary and its tokenizer."""
