"""grain input pipelines: synthetic tasks, text files, tfds."""
