"""Training data from an LLM and an embedding model: paraphrase, augmentation and hard-negative
synthesis through any OpenAI-compatible endpoint (``llm``, ``jobs``, ``runner``), hard-negative
mining and score filtering with a qzhou-jax model (``mine``), deduplication and decontamination
(``filters``). The command is ``qzhou-jax synth``."""
