"""The training loop of ``vsl train``: Adam, step decay, gradient clipping, validation, exact resume.

One iteration::

    scores = scorer(images, captions, lengths)          # (B, B): the model, or a DDP wrapper of it
    parts  = objective(scores, image_semantic, caption_semantic)   # {"loss", "triplet", "vsl", ...}
    parts["loss"].backward(); clip; optimizer.step()

The learning rate is ``learning_rate * 0.1 ** (epoch // lr_update)`` (times a linear warm-up over the
first ``warmup_iters`` iterations, if set). The triplet loss takes the hardest negative
(``max_violation``) from epoch ``negatives_warmup_epochs`` on and sums over all negatives before. The
dev rsum is measured after every epoch and every ``val_step`` iterations. At every log step
:class:`~vsl.train.plateau.PlateauDetector` checks whether the scores have collapsed to a constant
(a warning, a ``plateau`` event, and with ``stop_on_plateau`` an early, resumable stop).

Output folder ``model_name``: ``checkpoint_{E}.pth.tar`` after epoch E (1-based: E epochs done),
``checkpoint_last.pth.tar`` (the latest state, also mid-epoch at every validation) and
``model_best.pth.tar`` (best dev rsum). All are written atomically and hold the optimizer, the
position (``epoch`` = epochs done, ``extra["batch"]`` = batches done in the next one), the best rsum
and every RNG state, so that ``--resume`` continues exactly as if the run had not stopped: the
final weights are bit-identical to an uninterrupted run with the same seed (on the same device).
"""
from __future__ import annotations

import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import metrics
from .. import distributed as vdist
from ..checkpoint import BEST, LAST, epoch_checkpoint, load_state, read_checkpoint, save_checkpoint
from ..config import Config
from ..errors import CheckpointError, ConfigError, VSLError
from ..data import PrecompDataset, Vocabulary, build_semantics, check_fits, default_max_captions, make_loader, vocab_file
from ..device import resolve_device
from ..evaluation import image_shard, score
from ..runtime import encode_split
from ..fileio import check_writable
from ..logs import RunLogger, progress_bar
from ..losses import VSLObjective
from ..models import VSLModel, build_model
from ..models.shortlist import shortlist_loss
from ..precision import precision_context
from .plateau import Plateau, PlateauDetector

class DivergenceError(VSLError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped before updating."""


def learning_rate(config: Config, epoch: int, iteration: int) -> float:
    """Step decay x0.1 every ``lr_update`` epochs (published), with optional linear warm-up; during the
    negatives warm-up ``negatives_warmup_lr`` (if set) replaces ``learning_rate``."""
    base = config.learning_rate
    if config.negatives_warmup_lr is not None and epoch < config.negatives_warmup_epochs:
        base = config.negatives_warmup_lr
    lr = base * 0.1 ** (epoch // max(1, config.lr_update))
    if config.warmup_iters > 0 and iteration < config.warmup_iters:
        lr *= (iteration + 1) / config.warmup_iters
    return lr


def hardest_negatives(config: Config, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) keeps only the hardest negative of each positive."""
    return config.max_violation and epoch >= config.negatives_warmup_epochs


# ------------------------------------------------------------------------------------------------
# Random number generators (checkpointed as plain tensors/lists: weights_only loading refuses numpy)
# ------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)          # also seeds every CUDA device


def rng_state() -> Dict[str, Any]:
    """Every RNG state the run depends on: torch CPU, CUDA (all devices), numpy, Python."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for device, s in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))


# ------------------------------------------------------------------------------------------------
@dataclass
class Position:
    """Where a run stands: ``epoch`` epochs done, ``batch`` batches done in the next one."""

    epoch: int = 0
    batch: int = 0
    iteration: int = 0
    best_rsum: float = 0.0


class Trainer:
    """Everything one training run needs; :meth:`run` trains to ``config.num_epochs``.

    Args:
        config: the run's options (``vocab_size`` is set from the vocabulary file).
        resume: a checkpoint to continue from (vsl format: exact; published format: weights and
            position only).
        distributed: the :class:`vsl.distributed.DistInfo` of a torchrun process. The loss then
            sees the global batch (semantic matrices included), validation is sharded over the ranks,
            only rank 0 writes checkpoints and logs, and checkpoints hold every rank's RNG states
            (exact resume with the same world size). ``None``: one process on ``config.device``.
        progress: show progress bars (rank 0 only).
    """

    def __init__(self, config: Config, resume: Optional[Union[str, Path]] = None, *,
                 distributed: Optional[vdist.DistInfo] = None, progress: bool = True):
        # Where the run happens, and its outputs: a bad output path fails before any work.
        self.dist = distributed if distributed is not None else vdist.DistInfo(device=resolve_device(config.device))
        self.rank, self.world_size, self.is_main = self.dist.rank, self.dist.world_size, self.dist.is_main
        self.device, self.progress = self.dist.device, progress and self.is_main
        if self.world_size > 1 and config.shortlist_weight > 0:
            raise ConfigError("--shortlist_weight is not supported under torchrun; train without it and fit "
                              "the head afterwards with `vsl fit-shortlist`")
        if self.is_main:
            check_writable(config.model_name, "folder")
            check_writable(config.logger_name, "folder")

        # Data: the vocabulary fixes vocab_size; the semantic matrices only when a semantic loss is on.
        vocab = Vocabulary.from_json(vocab_file(config.vocab_path, config.data_name))
        config = config.replace(vocab_size=len(vocab))
        self.train_set = PrecompDataset(config.data_path, config.data_name, "train", vocab)
        self.dev_set = PrecompDataset(config.data_path, config.data_name, "dev", vocab,
                                      max_captions=default_max_captions("dev", config.val_all))
        check_fits(config, self.train_set, source="--img_dim/--num_regions")
        self.config, self.vocab = config, vocab
        self.dev_tokens = [vocab.encode(c) for c in self.dev_set.captions]
        self.semantics = (build_semantics(config.semantic, self.train_set.captions, self.train_set.captions_per_image)
                          if config.vsl_weight != 0 else None)

        # Model: initialised from the seed (the same weights on every rank; DDP also broadcasts
        # rank 0's), then each rank draws its own dropout masks (one stream would correlate them).
        seed_everything(config.seed)
        self.model: VSLModel = build_model(config).to(self.device)
        self.scorer = vdist.wrap_model(self.model, self.dist)
        if self.world_size > 1:
            seed_everything(config.seed + 1000003 * (self.rank + 1))
        self.objective = VSLObjective(margin=config.margin, max_violation=config.max_violation,
                                      vsl_weight=config.vsl_weight, temperature=config.vsl_temperature,
                                      vsl_rank=config.vsl_rank, textual=config.textual_semantic_loss)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)
        self.plateau = PlateauDetector(config.plateau_spread, config.plateau_log_steps)
        self.stopped: Optional[str] = None          # why the run stopped before num_epochs
        self.last_batch_size = 0                    # B of the last step's (B, B) scores

        # Position: a fresh run, or where ``resume`` stopped (weights, Adam, position, RNG streams).
        self.out_dir = Path(config.model_name)
        self.pos = Position()
        self.resumed = resume is not None
        rng = self._load(Path(resume)) if resume is not None else None
        self.logger = RunLogger(config.logger_name, enabled=self.is_main,
                                resume_step=self.pos.iteration if self.resumed else None)
        if rng is not None:          # last: nothing above may draw from the restored streams
            set_rng_state(rng)

    # --------------------------------------------------------------------------------------------
    def _load(self, path: Path) -> Optional[Dict[str, Any]]:
        ckpt = read_checkpoint(path)
        load_state(self.model, ckpt["model"], path, ckpt["shortlist"])
        if ckpt["optimizer"] is not None:
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError, RuntimeError) as exc:     # (load_state_dict moves it to the model's device)
                raise CheckpointError(f"{path}: optimizer state does not fit the model ({exc})") from None
        extra = ckpt["extra"]
        self.pos = Position(epoch=ckpt["epoch"], batch=int(extra.get("batch", 0)),
                            iteration=ckpt["iteration"], best_rsum=ckpt["best_rsum"])
        if self.pos.epoch >= self.config.num_epochs and self.pos.batch == 0:
            raise ConfigError(f"{path}: the run already has {self.pos.epoch} epochs; "
                              f"raise --num_epochs above {self.pos.epoch} to train further")
        if self.world_size > 1:
            ranks = extra.get("rng_ranks") or []
            if len(ranks) == self.world_size:
                return ranks[self.rank]
            if self.is_main:
                warnings.warn(f"{path}: written by {extra.get('world_size', 1)} process(es), resumed with "
                              f"{self.world_size}: the global batches continue exactly, the dropout streams do not",
                              stacklevel=2)
            return None
        return extra.get("rng")

    def _save(self, names) -> None:
        # Every rank's RNG states (a collective: all ranks call _save), so that a resumed
        # distributed run continues every rank's dropout stream.
        states = vdist.all_gather_objects(rng_state(), self.dist.group) if self.world_size > 1 else None
        if not self.is_main:
            return
        extra = {"batch": self.pos.batch, "rng": rng_state(), "world_size": self.world_size}
        if states is not None:
            extra["rng"], extra["rng_ranks"] = states[0], states
        for name in names:
            save_checkpoint(self.out_dir / name, self.model, self.config, optimizer=self.optimizer,
                            epoch=self.pos.epoch, iteration=self.pos.iteration, best_rsum=self.pos.best_rsum,
                            extra=extra)

    # --------------------------------------------------------------------------------------------
    def train_step(self, batch) -> Dict[str, torch.Tensor]:
        """One optimisation step on a :class:`vsl.data.Batch`; returns the detached loss parts."""
        batch = batch.to(self.device, non_blocking=True)
        head_loss = None
        with precision_context(self.config.precision, self.device):
            if self.config.shortlist_weight > 0:
                # Joint shortlist head: the same scores as the scorer's, from embeddings it can share.
                img_emb = self.model.encode_images(batch.images)                          # (B, R, d)
                cap_emb = self.model.encode_captions(batch.captions, batch.lengths)       # (B, L, d)
                scores = self.model.similarity(img_emb, cap_emb, batch.lengths)           # (B, B)
                head = self.model.shortlist
                head_loss = shortlist_loss(head.images(img_emb).float(),
                                           head.captions(cap_emb, batch.lengths).float(), batch.image_ids,
                                           loss=self.config.shortlist_loss,
                                           temperature=self.config.shortlist_temperature)
            else:
                scores = self.scorer(batch.images, batch.captions, batch.lengths)      # (B, B)
        image_semantic, caption_semantic = batch.image_semantic, batch.caption_semantic
        if self.world_size > 1 and self.semantics is not None:
            image_semantic, caption_semantic = self._global_semantics(batch.caption_ids)
        parts = self.objective(scores.float(), image_semantic, caption_semantic)
        if head_loss is not None:
            parts["shortlist"] = head_loss
            parts["loss"] = parts["loss"] + self.config.shortlist_weight * head_loss
        # The spread of the scores tells a collapsed matrix (the plateau) from a learning one.
        parts["score_std"] = scores.detach().float().std(correction=0)
        self.last_batch_size = scores.shape[0]
        self._check_finite("loss", parts["loss"])
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if self.config.grad_clip > 0:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self._check_finite("gradient norm", norm)
        self.optimizer.step()
        return {k: v.detach() for k, v in parts.items()}

    def _global_semantics(self, caption_ids: torch.Tensor):
        """Semantic matrices ``(B, B)`` of the global batch from this rank's caption ids ``(b,)``."""
        ids = vdist.all_gather_concat(caption_ids, self.dist.group).cpu().numpy()
        image = torch.from_numpy(self.semantics.image_semantic(ids, self.semantics.captions_per_image))
        caption = (torch.from_numpy(self.semantics.caption_semantic(ids))
                   if self.config.textual_semantic_loss else None)
        return image.to(self.device), caption.to(self.device) if caption is not None else None

    def _check_finite(self, what: str, value: torch.Tensor) -> None:
        if not torch.isfinite(value):
            last = self.out_dir / LAST
            kept = (f"the last good checkpoint {last} is intact (resume with --resume {last})"
                    if last.exists() else "no checkpoint was written yet")
            raise DivergenceError(f"{self.out_dir}: training stopped: the {what} is {value.item()} at epoch "
                                  f"{self.pos.epoch + 1}, iteration {self.pos.iteration + 1}; {kept}")

    @torch.no_grad()
    def validate(self) -> Dict[str, Any]:
        """Dev retrieval metrics (``retrieval_metrics`` form, with ``rsum``)."""
        self.model.eval()
        n = self.dev_set.num_images
        emb = encode_split(self.model, self.dev_set.images[:n], self.dev_tokens, source=str(self.dev_set.images_path),
                           batch_size=self.config.batch_size, progress=False, precision=self.config.precision)
        start, stop = image_shard(n, self.rank, self.world_size)     # this rank's share of the rows
        bar = progress_bar((stop - start) * len(self.dev_tokens), "validate", enabled=self.progress, unit="pair",
                           unit_scale=True, leave=False)
        sims = score(self.model, emb, bar=bar, precision=self.config.precision, group=self.dist.group)
        bar.close()
        self.model.train()
        return metrics.retrieval_metrics(sims.numpy(), captions_per_image=self.dev_set.captions_per_image)

    def _validate_and_save(self, names) -> float:
        result = self.validate()            # every rank: the scoring is split over the ranks
        rsum = result["rsum"]
        if self.is_main:
            self.logger.log(self.pos.iteration, "val", epoch=self.pos.epoch, rsum=rsum,
                            **{f"i2t_{k}": v for k, v in result["i2t"].items()},
                            **{f"t2i_{k}": v for k, v in result["t2i"].items()})
        is_best = rsum > self.pos.best_rsum
        if is_best:
            self.pos.best_rsum = rsum
        self._save(list(names) + ([BEST] if is_best else []))
        return rsum

    # --------------------------------------------------------------------------------------------
    def _on_plateau(self, plateau: Plateau, epoch: int) -> bool:
        """Warn and log once per plateau; True when ``stop_on_plateau`` says to stop now."""
        cfg = self.config
        if self.plateau.announce() and self.is_main:
            tqdm.write(plateau.warning(self.plateau.std_threshold(cfg.margin)), file=sys.stderr)
            self.logger.log(plateau.step, "plateau", epoch=epoch, since=plateau.since, score_std=plateau.score_std,
                            triplet=plateau.triplet, collapsed=plateau.collapsed)
        if cfg.stop_on_plateau <= 0 or plateau.iterations < cfg.stop_on_plateau:
            return False
        self._save([LAST])                          # every rank: the save gathers the RNG states
        self.logger.log(plateau.step, "plateau_stop", epoch=epoch, since=plateau.since, iterations=plateau.iterations)
        last = self.out_dir / LAST
        self.stopped = (f"stopped after {plateau.iterations} iterations on the plateau of constant scores "
                        f"(since iteration {plateau.since}; --stop_on_plateau {cfg.stop_on_plateau}); {last} "
                        f"holds iteration {plateau.step} (continue with --resume {last} --stop_on_plateau 0, "
                        f"or start again with --fast_start)")
        return True

    def train_epoch(self, epoch: int) -> bool:
        """Train epoch ``epoch`` from the current position; False when the run stopped on the plateau."""

        cfg = self.config
        # VSL off during its warm-up epochs (demo recipe; the paper uses VSL from the start).
        self.objective.semantic.weight = 0.0 if epoch < cfg.vsl_warmup_epochs else cfg.vsl_weight
        # All negatives during the negatives warm-up (--fast_start; the paper: hardest from the start).
        self.objective.triplet.max_violation = hardest_negatives(cfg, epoch)
        loader = make_loader(self.train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                             workers=cfg.workers, textual=cfg.textual_semantic_loss and self.world_size == 1,
                             # distributed: the global batch's matrices are built in train_step
                             semantics=self.semantics if self.world_size == 1 else None,
                             rank=self.rank, world_size=self.world_size, start_batch=self.pos.batch)
        total = loader.batch_sampler.total_batches
        # Creating the iterator draws a worker seed from the global RNG; keep the training stream
        # (dropout) independent of where a run was resumed.
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
        bar = progress_bar(total, f"epoch {epoch + 1}/{cfg.num_epochs}", enabled=self.progress,
                           initial=self.pos.batch)
        self.model.train()
        for batch in batches:
            lr = learning_rate(cfg, epoch, self.pos.iteration)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            parts = self.train_step(batch)
            self.pos.iteration += 1
            self.pos.batch += 1
            bar.update(1)
            if self.pos.iteration % cfg.log_step == 0 or self.pos.batch == total:
                values = {k: float(v) for k, v in parts.items()}
                # batch_size: the plateau's collapsed value is that of the batch drawn (the last is short).
                self.logger.log(self.pos.iteration, "train", epoch=epoch, lr=lr, batch_size=self.last_batch_size,
                                **values)
                bar.set_postfix(loss=f"{values['loss']:.4g}", triplet=f"{values['triplet']:.4g}",
                                vsl=f"{values['vsl']:.4g}", lr=f"{lr:.2g}", refresh=False)
                plateau = self.plateau.update(self.pos.iteration, values["triplet"], values["score_std"],
                                              self.last_batch_size, cfg.margin, self.objective.triplet.max_violation)
                if plateau is not None and self._on_plateau(plateau, epoch):
                    bar.close()
                    return False
            if cfg.val_step > 0 and self.pos.iteration % cfg.val_step == 0 and self.pos.batch < total:
                self._validate_and_save([LAST])     # mid-epoch: resumable from checkpoint_last
        bar.close()
        return True

    def run(self) -> Dict[str, Any]:
        """Train from the current position to ``config.num_epochs``; returns a summary."""
        start = time.time()
        try:
            for epoch in range(self.pos.epoch, self.config.num_epochs):
                if not self.train_epoch(epoch):
                    break                           # stopped on the plateau (self.stopped says why)
                self.pos.epoch, self.pos.batch = epoch + 1, 0
                rsum = self._validate_and_save([epoch_checkpoint(epoch + 1), LAST])
                if self.progress:
                    print(f"epoch {epoch + 1}: dev rsum {rsum:.2f} (best {self.pos.best_rsum:.2f})", flush=True)
        finally:
            self.logger.close()
        return {"epoch": self.pos.epoch, "iteration": self.pos.iteration, "best_rsum": self.pos.best_rsum,
                "last": str(self.out_dir / LAST), "best": str(self.out_dir / BEST),
                "seconds": time.time() - start, "stopped": self.stopped}


def train(config: Config, resume: Optional[Union[str, Path]] = None, **kwargs: Any) -> Dict[str, Any]:
    """Run ``vsl train``: build a :class:`Trainer` (``kwargs`` go to it) and train to the end."""
    return Trainer(config, resume, **kwargs).run()
