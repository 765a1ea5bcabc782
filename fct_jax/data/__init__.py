"""Data: sources (random access), the embedded demo generator, augmentation and the grain pipeline."""
