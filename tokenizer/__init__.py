"""Semantic IDs (SID-v2): content encoders, the RQ-VAE, SID tables and re-tokenization."""

from tokenizer.text_encoder import TextEncoder, TextEncoderError

__all__ = ["TextEncoder", "TextEncoderError"]
