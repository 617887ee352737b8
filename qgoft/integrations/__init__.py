"""Integrations with training frameworks, each imported on its own so that qgoft does not require them:
``qgoft.integrations.transformers`` (the Hugging Face Trainer, hence accelerate)."""
