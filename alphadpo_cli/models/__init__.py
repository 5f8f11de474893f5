"""Loading models and tokenizers, their sources, chat templates, and the reference network."""
