"""OOD scores by name, on logits and on penultimate features: higher = more OOD."""
