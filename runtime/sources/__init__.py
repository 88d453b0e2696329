"""Where weights and data come from: Hugging Face checkpoint directories, GGUF files,
the packaged models, tiny checkpoints made for tests, and the text tasks."""
