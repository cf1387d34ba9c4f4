"""Generative retrieval end to end: vocabulary and catalogue from a SID table, model initialisation
(random or warm-started from SmolLM2), the CPT and SFT stages, and recommendation by constrained
beam search with evaluation under the leave-one-out protocol.

The caller (ops) supplies the data: SIDs per item, titles, user sequences with rewards. Nothing
here knows where they came from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer.data import Catalogue, RewardedSequences, cpt_batches, history_tokens, left_pad, prefix_length, sft_batches
from trainer.decoding import BeamResult, BeamSteps, SIDTrie, beam_search, invalid_share
from trainer.evaluate import EvalSet, effective_vocabulary, rank_metrics
from trainer.model import DECODER_SIZES, INIT_STD, Decoder
from trainer.train import OptimConfig, TrainLoop
from trainer.vocab import BOS, EOS, VocabLayout

Say = Callable[[str], None]


@dataclass(frozen=True)
class RetrievalSettings:
    """One generative-retrieval run: model, stages, decoding. `init` is "random" or "smollm2"."""

    model_size: str = "small"
    init: str = "random"
    keep_layers: int = 4
    cpt_steps: int = 0
    sft_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    max_history: int = 20
    beam_width: int = 20
    eval_batch: int = 128
    seed: int = 0
    dropout: float = 0.0  # residual dropout of CPT and SFT steps
    weight_decay: float = 0.01  # AdamW's decoupled decay
    # Model selection on the validation targets (when the caller gives them): every validate_every
    # SFT steps Recall@10 of up to validation_users users is measured; SFT stops after `patience`
    # checks without a new best and the best checkpoint is kept. 0: no checks, the last step wins.
    validate_every: int = 0
    validation_users: int = 1000
    patience: int = 3
    ema_decay: float = 0.0  # > 0: the stages keep, validate and return a moving average of the weights
    # Embedding rows of the SID code tokens: "random" as every other new row, or "codebook": each
    # level's RQ-VAE codebook vectors (centred, fixed random projection to the model width, scaled
    # to the init's 0.02), so codes the tokenizer placed near each other start near each other.
    sid_init: str = "random"
    # SFT targets: "reward" keeps each with probability reward / max reward (the paper's reward
    # sampling); "all" keeps every target, as the leave-one-out test asks for every next item.
    target_sampling: str = "reward"
    # > 0: that share of each SFT target SID token is spread evenly over its position's tokens
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.init not in ("random", "smollm2"):
            raise ValueError(f"init must be 'random' or 'smollm2', got {self.init!r}")
        if self.init == "random" and self.model_size not in DECODER_SIZES:
            raise ValueError(f"unknown model size {self.model_size!r}; known: {', '.join(DECODER_SIZES)}")
        if self.sid_init not in ("random", "codebook"):
            raise ValueError(f"sid_init must be 'random' or 'codebook', got {self.sid_init!r}")
        if self.target_sampling not in ("reward", "all"):
            raise ValueError(f"target_sampling must be 'reward' or 'all', got {self.target_sampling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.weight_decay < 0 or self.validate_every < 0 or self.validation_users < 1 or self.patience < 1:
            raise ValueError("weight_decay and validate_every must not be negative, validation_users and patience "
                             "must be at least 1")

    def buckets(self, layout: VocabLayout) -> tuple[int, ...]:
        """Padded lengths: the longest retrieval example, and shorter lengths 1.5x to 2x apart, one
        compile each. Batches are grouped by length, so finer steps waste less padding on short
        histories (a quality row records its batches' real share, `real_token_share`)."""
        longest = prefix_length(layout) + 1 + (self.max_history + 1) * (layout.sid_depth + 1)
        longest = max(longest, 64)
        return tuple(sorted({*(b for b in (16, 24, 32, 48, 64, 96, 128, 192, 256) if b < longest), longest}))


def text_vocabulary(encoded_titles: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The BPE ids the catalogue's titles use, sorted: the text section of the layout."""
    return tuple(sorted({i for title in encoded_titles for i in title}))


def make_catalogue(layout: VocabLayout, sids: np.ndarray, encoded_titles: Sequence[Sequence[int]],
                   max_title_tokens: int = 48) -> Catalogue:
    """SIDs [n_items, levels + 1] (codes + suffix) and BPE titles -> the catalogue in token ids."""
    item_sids = np.array([layout.sid_tokens(row) for row in np.asarray(sids)], np.int32)
    titles = tuple(tuple(layout.text_tokens(t[:max_title_tokens])) for t in encoded_titles)
    return Catalogue(item_sids, titles)


def sid_trie(layout: VocabLayout, catalogue: Catalogue) -> SIDTrie:
    """The trie of every catalogue item's SID; leaf values are dense item indices."""
    ranges = list(zip(layout.sid_offsets, layout.sid_widths))
    return SIDTrie([tuple(row) for row in catalogue.item_sids.tolist()], ranges)


def codebook_rows(codebooks: Sequence[np.ndarray], dim: int, seed: int = 0, scale: float = INIT_STD) -> np.ndarray:
    """Embedding rows for the SID code tokens, level after level, from the RQ-VAE codebooks
    ([codes, latent] per level): each level centred, projected to `dim` by one fixed Gaussian map
    (distances kept up to a common factor), then scaled so its entries have standard deviation
    `scale`. Returns [sum of codebook sizes, dim] float32."""
    if not codebooks:
        raise ValueError("no codebooks to initialise SID rows from")
    latent = codebooks[0].shape[1]
    if any(c.ndim != 2 or c.shape[1] != latent for c in codebooks):
        raise ValueError("codebooks must be [codes, latent] with one latent width")
    projection = np.random.default_rng(seed).normal(size=(latent, dim))
    rows = []
    for codebook in codebooks:
        centred = np.asarray(codebook, np.float64) - np.mean(codebook, axis=0)
        level = centred @ projection
        rows.append(level * scale / max(float(np.std(level)), 1e-12))
    return np.concatenate(rows).astype(np.float32)


def init_model(settings: RetrievalSettings, layout: VocabLayout, gguf_path: Path | None = None,
               bos_eos: tuple[int, int] | None = None, codebooks: Sequence[np.ndarray] | None = None) -> Decoder:
    """A decoder over `layout`: random init of a named size, or SmolLM2's first `keep_layers` layers
    with its embedding rows for the layout's text tokens (and BOS/EOS), new rows as warm_start does.
    With settings.sid_init == "codebook" the SID code rows come from `codebooks` (`codebook_rows`)."""
    model = _init_weights(settings, layout, gguf_path, bos_eos)
    if settings.sid_init == "codebook":
        if codebooks is None or tuple(len(c) for c in codebooks) != layout.codebook_sizes:
            raise ValueError(f"sid_init 'codebook' needs one codebook per SID level of sizes {layout.codebook_sizes}")
        table = model.embed.embedding[...]
        start = layout.sid_offsets[0]
        rows = codebook_rows(codebooks, table.shape[1], settings.seed)
        model.embed.embedding[...] = table.at[start:start + len(rows)].set(jnp.asarray(rows, table.dtype))
    return model


def _init_weights(settings: RetrievalSettings, layout: VocabLayout, gguf_path: Path | None,
                  bos_eos: tuple[int, int] | None) -> Decoder:
    if settings.init == "random":
        return Decoder(DECODER_SIZES[settings.model_size].replace(vocab_size=layout.size), nnx.Rngs(settings.seed))
    if gguf_path is None:
        raise ValueError("a SmolLM2 warm start needs the GGUF path")
    from trainer.warm_start import load_pretrained, new_rows  # the GGUF reader only when needed

    pretrained = load_pretrained(gguf_path, keep_layers=settings.keep_layers)
    params = nnx.to_pure_dict(nnx.state(pretrained, nnx.Param))
    old = np.asarray(params["embed"]["embedding"])
    table = new_rows(old, layout.size, np.random.default_rng(settings.seed))
    table[layout.text_offset:layout.text_offset + len(layout.text_ids)] = old[list(layout.text_ids)]
    if bos_eos is not None:
        table[BOS], table[EOS] = old[bos_eos[0]], old[bos_eos[1]]
    params["embed"]["embedding"] = jnp.asarray(table, old.dtype)
    cfg = pretrained.cfg.replace(vocab_size=layout.size)
    # the Rngs are made inside the traced constructor: eval_shape may not mutate one from outside
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(settings.seed))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


@dataclass(frozen=True, eq=False)
class Validation:
    """Held-out validation targets for model selection during SFT, with their histories' rewards."""

    eval_set: EvalSet
    rewards: Sequence[Sequence[float]]


def train_stages(model: Decoder, settings: RetrievalSettings, layout: VocabLayout, catalogue: Catalogue,
                 sequences: RewardedSequences, say: Say = print, validation: Validation | None = None,
                 ) -> tuple[Decoder, dict[str, list[dict[str, float]]]]:
    """CPT (when cpt_steps > 0) then SFT, each with its own optimizer; returns the model (the moving
    average of its weights with settings.ema_decay > 0) and histories.

    With `validation` and settings.validate_every > 0, SFT is checked on the validation targets and
    the best check's model is returned; histories["sft_selection"] lists the checks (step,
    Recall/NDCG@10, loss), then the selected step and how many steps ran."""
    rng = np.random.default_rng(settings.seed)
    buckets = settings.buckets(layout)
    histories: dict[str, list[dict[str, float]]] = {}
    for stage, steps in (("cpt", settings.cpt_steps), ("sft", settings.sft_steps)):
        if steps <= 0:
            continue
        if stage == "cpt":
            batches = cpt_batches(layout, catalogue, sequences, settings.batch_size, settings.max_history, buckets, rng)
        else:
            batches = sft_batches(layout, catalogue, sequences, settings.batch_size, settings.max_history, buckets,
                                  rng, reward_sampling=settings.target_sampling == "reward")
        optim = OptimConfig(settings.learning_rate, settings.warmup_steps, steps, weight_decay=settings.weight_decay)
        loop = TrainLoop(model, optim, dropout=settings.dropout, seed=settings.seed,
                         sid_levels=layout.sid_levels if stage == "sft" else None, ema_decay=settings.ema_decay,
                         label_smoothing=settings.label_smoothing if stage == "sft" else 0.0)
        if stage == "sft" and validation is not None and settings.validate_every > 0:
            histories[stage], histories["sft_selection"] = _select_on_validation(
                loop, batches, steps, settings, layout, catalogue, validation, say)
        else:
            histories[stage] = loop.run(batches, steps, say, label=stage)
        model = loop.averaged_model()
    return model, histories


def _select_on_validation(loop: TrainLoop, batches: Iterator[dict[str, np.ndarray]], steps: int,
                          settings: RetrievalSettings, layout: VocabLayout, catalogue: Catalogue,
                          validation: Validation, say: Say) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """SFT in chunks of validate_every steps, each followed by validation Recall/NDCG@10; stops after
    `patience` chunks without a better Recall@10 (NDCG@10 breaking ties) and leaves the loop at the
    best chunk's state."""
    eval_set = validation.eval_set.head(settings.validation_users)
    rewards = validation.rewards[:len(eval_set.targets)]
    history: list[dict[str, float]] = []
    checks: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    best_state, stale, done = None, 0, 0
    while done < steps and stale < settings.patience:
        chunk = min(settings.validate_every, steps - done)
        history += loop.run(batches, chunk, say, label=f"sft {done + 1}-{done + chunk}/{steps}",
                            report_every=max(1, chunk // 4))
        done += chunk
        recommender = Recommender(loop.averaged_model(), layout, catalogue, settings.max_history)
        metrics, _ = evaluate(recommender, eval_set, rewards, settings.beam_width, settings.eval_batch)
        check = {"step": done, "recall@10": metrics["recall@10"], "ndcg@10": metrics["ndcg@10"],
                 "loss": history[-1]["loss"]}
        checks.append(check)
        if best is None or _score(check) > _score(best):
            best, best_state, stale = check, loop.state_dict(), 0
        else:
            stale += 1
        say(f"sft: validation after step {done}: R@10 {check['recall@10']:.4f} N@10 {check['ndcg@10']:.4f} "
            f"({len(eval_set.targets):,} users; best {best['recall@10']:.4f} / {best['ndcg@10']:.4f}"
            f"{', stopping' if stale >= settings.patience else ''})")
    if stale:
        loop.load_state_dict(best_state)
    checks.append({"selected_step": best["step"], "recall@10": best["recall@10"], "ndcg@10": best["ndcg@10"],
                   "steps_run": done})
    return history, checks


def _score(check: dict[str, float]) -> tuple[float, float]:
    """What validation selection maximises: Recall@10, NDCG@10 breaking a tie."""
    return check["recall@10"], check["ndcg@10"]


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _search(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, mask: jax.Array, trie: SIDTrie,
            beam_width: int, constrained: bool, banned: jax.Array | None) -> BeamResult:
    model = nnx.merge(graphdef, state)
    rows = (trie.vocab_start, trie.vocab_end)  # the search reads only the SID tokens' logits
    prefill = functools.partial(model.extend, last_only=True, rows=rows)  # and only at the last prompt position
    return beam_search(prefill, model.init_cache, tokens, mask, trie, beam_width, constrained, banned=banned,
                       beams=BeamSteps(model.start_beams, functools.partial(model.extend_beams, rows=rows)),
                       logits_offset=rows[0])


class Recommender:
    """A trained decoder with its vocabulary, catalogue and trie: prompts in, item indices out."""

    def __init__(self, model: Decoder, layout: VocabLayout, catalogue: Catalogue, max_history: int) -> None:
        self.graphdef, self.state = nnx.split(model)
        self.layout, self.catalogue, self.max_history = layout, catalogue, max_history
        self.trie = jax.device_put(sid_trie(layout, catalogue))
        self.prompt_length = prefix_length(layout) + max_history * (layout.sid_depth + 1)

    def search(self, histories: Sequence[Sequence[int]], rewards: Sequence[Sequence[float]], beam_width: int,
               batch_size: int, constrained: bool = True,
               contexts: Sequence[Mapping[str, object] | None] | None = None,
               exclude: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Beam items [n, beam_width] (dense indices, -1 for none or, unconstrained, for an invalid SID)
        and their scores, batch by batch; `contexts` are the requests' context-feature values;
        `exclude` lists per request items the constrained search must not return (seen items)."""
        items, scores = [], []
        contexts = contexts if contexts is not None else [None] * len(histories)
        for start in range(0, len(histories), batch_size):
            stop = start + batch_size
            prompts = [history_tokens(self.layout, self.catalogue, h[-self.max_history:], r[-self.max_history:], c)
                       for h, r, c in zip(histories[start:stop], rewards[start:stop], contexts[start:stop])]
            real = len(prompts)
            prompts += [prompts[-1]] * (batch_size - real)  # a fixed batch shape compiles once
            tokens, mask = left_pad(prompts, self.prompt_length)
            banned = None
            if exclude is not None and constrained:
                banned = np.zeros((batch_size, len(self.catalogue.item_sids)), bool)
                for row, items_seen in enumerate(exclude[start:start + real]):
                    banned[row, np.asarray(items_seen, np.int64)] = True
                banned = jnp.asarray(banned)
            result = _search(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(mask), self.trie, beam_width,
                             constrained, banned)
            items.append(np.asarray(result.items)[:real])
            scores.append(np.asarray(result.scores)[:real])
        return np.concatenate(items), np.concatenate(scores)


def top_k_unseen(beam_items: np.ndarray, seen: Sequence[np.ndarray] | None, k: int) -> np.ndarray:
    """The first k beam items per user that are not in `seen` (the protocol's exclusion), -1 padded."""
    out = np.full((len(beam_items), k), -1, np.int64)
    for row, items in enumerate(beam_items):
        skip = set() if seen is None else set(np.asarray(seen[row]).tolist())
        kept = [i for i in items.tolist() if i >= 0 and i not in skip][:k]
        out[row, :len(kept)] = kept
    return out


def evaluate(recommender: Recommender, eval_set: EvalSet, rewards: Sequence[Sequence[float]], beam_width: int,
             batch_size: int, exclude_seen: bool = True, k: int = 10, invalid_rate_users: int = 0,
             contexts: Sequence[Mapping[str, object] | None] | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Recall/NDCG@5/10, the effective vocabulary of the top-k lists and the invalid-SID rate of
    the constrained beams; returns (metrics, ranked).

    With invalid_rate_users > 0, the first that many users also get an unconstrained search of
    k beams, whose share of SIDs that map to no item is the model's invalid-SID rate (the
    constrained search's is 0 by construction).
    """
    beams, scores = recommender.search(eval_set.histories, rewards, beam_width, batch_size, contexts=contexts,
                                       exclude=eval_set.seen if exclude_seen else None)
    ranked = top_k_unseen(beams, eval_set.seen if exclude_seen else None, k)
    metrics = rank_metrics(ranked, eval_set.targets, ks=tuple(sorted({min(5, k), k})))
    metrics["effective_vocabulary"] = effective_vocabulary(ranked)
    metrics["invalid_sid_rate"] = invalid_share(beams, scores)  # constrained: 0 unless the trie is broken
    metrics["users"] = len(ranked)
    if invalid_rate_users:
        n = min(invalid_rate_users, len(ranked))
        free, scores = recommender.search(eval_set.histories[:n], rewards[:n], k, batch_size, constrained=False,
                                          contexts=None if contexts is None else contexts[:n])
        metrics["invalid_sid_rate_unconstrained"] = invalid_share(free, scores)
    return metrics, ranked
