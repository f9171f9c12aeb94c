"""Caption metrics: BLEU, METEOR, ROUGE-L, CIDEr-D, content F1 and grounding."""
