"""The decoder LM and its training: vocabulary, model, warm start, CPT and SFT, decoding, evaluation.

Modules: vocab (token layout), data (documents and batches), model (the decoder), warm_start
(SmolLM2 from its GGUF), train (the one train step and mesh), checkpoint (orbax + manifest),
decoding (constrained beam search, shared with serving), evaluate (the protocol), retrieval
(end-to-end generative retrieval), sasrec (the baseline), jobs (CPT over the running system's
data). Nothing is imported here, so the config does not pull in JAX.
"""
