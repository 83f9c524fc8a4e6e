"""The benchmark's data: the flan-flat schema, its loader and collation, the synthetic
Flan-like task suite and the character tokenizer."""
