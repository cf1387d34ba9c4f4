"""The pipeline's named transforms when the runner owns the state, each in its own module
(TestPipeline tests in tests/unit/test_transforms.py):

  dead_letters  Reject -> the dead-letter topic (flushed before the bundle commits)
  user_state    ParsedBatch -> per-user keyed state (ingest/folds.py) -> UserUpdate; users online
  batches       UserUpdate, keyed by source batch -> one UserBatch once every user of it is folded
  item_state    UserBatch -> per-item keyed state -> absolute ItemStats; item metadata by position
  stores        where the sinks write; a key's online value is written by the key's owner
  writes        the idempotent file sinks: training log and Feast offline files

`ingest/pipeline.py` wires them in `build_with_runner_state`.
"""
