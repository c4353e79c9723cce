"""Data collators. Packed causal-LM blocks need none beyond `transformers.default_data_collator`
(every block is full length, with `labels`); masking collators (LEM, lexicon) live here."""
