"""`plum bench ...`: benchmarks that write JSON under ops/bench/results/ and a README table."""

# The PLUM rows' SFT recipe: `plum bench quality`'s defaults and the Recall@10 column of
# `plum bench sid` (measured on MovieLens-100K: residual dropout and weight decay against
# overfitting the training windows, and the best of the validation checks kept).
SFT_RECIPE = {"dropout": 0.2, "weight_decay": 0.1, "validate_every": 250, "patience": 3, "ema_decay": 0.0}
