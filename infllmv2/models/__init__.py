"""Integrations of InfLLM-V2 with model libraries (``transformers``: ``infllmv2.models.transformers``)."""
