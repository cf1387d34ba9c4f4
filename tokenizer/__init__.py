"""Semantic IDs (SID-v2): content encoders, the RQ-VAE, SID tables and re-tokenization.

Modules: text_encoder (MiniLM in JAX), content (modality features), rqvae (the model),
rqvae_train (k-means init, training, code assignment), sid_table (the versioned artifact),
jobs (fit and assign). Nothing is imported here, so the config does not pull in JAX.
"""
