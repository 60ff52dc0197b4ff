"""Preference training of a causal LM: ``DPO`` (and its loss variants), ``ORPO`` and ``SimPO``.

They take the batches of ``lmtune.dataset.preference`` (``sequence_index`` numbers the chosen and rejected
sequences of each pair) and build on ``SupervisedFinetune`` for everything else: quantization, LoRA, the
chunked head (each token's log-probability is computed a chunk of positions at a time, so the logits of a
batch are never held), packed sequences kept apart, checkpoints.

``forward`` returns per-pair sums (``loss_terms``, ``metrics``): the loop divides them by the pairs (and
chosen tokens) of the whole optimizer step on all ranks, so accumulation and ranks give the loss of one large
batch. The formulas follow the papers and the definitions TRL and XTuner use (the tests check them against
TRL's trainers).
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtune.config.build import is_type_dict
from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.errors import ConfigError
from lmtune.model.build import build_llm
from lmtune.model.loss import (
    SEQUENCE_INDEX,
    causal_lm_token_logps,
    linear_token_logps,
    loss_units,
    sequence_targets,
    shifted_targets,
)
from lmtune.model.sft import SupervisedFinetune

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "kto_pair", "sppo_hard", "nca_pair", "bco_pair")


def _frozen(model: nn.Module) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def sequence_keys(input_ids: torch.Tensor, labels: torch.Tensor, sequence_index: torch.Tensor) -> list[bytes]:
    """A digest of each sequence of a preference batch (its token ids and labels), in sequence order: the key of
    its precomputed reference log-probability, whatever rows or packing it comes in."""
    import hashlib

    flat = sequence_index.flatten()
    keep = flat >= 0
    order = torch.argsort(flat[keep], stable=True)
    ids, labs = input_ids.flatten()[keep][order].cpu(), labels.flatten()[keep][order].cpu()
    counts = torch.bincount(flat[keep].cpu()).tolist()
    keys, start = [], 0
    for n in counts:
        digest = hashlib.blake2b(ids[start:start + n].numpy().tobytes(), digest_size=16)
        digest.update(labs[start:start + n].numpy().tobytes())
        keys.append(digest.digest())
        start += n
    return keys


def pair_sequence_index(model: nn.Module, batch: dict) -> torch.Tensor:
    """The ``sequence_index`` of a batch of pairs, or the error saying how to make one."""
    sequence_index = batch.get(SEQUENCE_INDEX)
    if sequence_index is None:
        builder = "build_preference_dataset(is_reward=True, ...)" if hasattr(model, "v_head") else \
            "build_preference_dataset"
        raise ConfigError(f"{type(model).__name__} trains on pairs: build train_dataset with {builder} and set "
                          "train_dataloader.collate_fn=dict(type=preference_collate_fn)")
    return sequence_index


def pair_outputs(terms: dict, metrics: dict, labels: torch.Tensor, sequence_index: torch.Tensor) -> dict[str, Any]:
    """What a model trained on pairs returns: the loop's inputs (``loss_terms``: sums per unit, ``metrics``: sums
    over the pairs) and this batch's own ``loss``, ``loss_sum`` and ``num_tokens`` (its pairs)."""
    units = loss_units({"labels": labels, SEQUENCE_INDEX: sequence_index})
    loss = sum(term / max(units[unit], 1) for unit, term in terms.items())
    return {"loss_terms": terms, "metrics": {k: v.detach() for k, v in metrics.items()},
            "loss_sum": terms["pairs"], "num_tokens": torch.tensor(units["pairs"]), "loss": loss}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for large ``-x``."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class PreferenceModel(SupervisedFinetune):
    """What the preference losses share: each sequence's summed log-probability of its response, and the
    number of its response tokens."""

    def __init__(self, llm: Any, beta: float = 0.1, **kwargs: Any) -> None:
        super().__init__(llm, **kwargs)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta <= 0:
            raise ConfigError(f"model.beta must be a positive number, got {beta!r}")
        self.beta = float(beta)

    def token_logps(self, llm: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The log-probability of each target that is not ignored (in the order of ``targets != IGNORE``)."""
        mask = targets != IGNORE_INDEX
        found = self._final_hidden(llm, input_ids, position_ids, attention_mask)
        if found is not None:
            hidden, head = found
            return linear_token_logps(hidden[mask], head, targets[mask], self.loss_chunk_size, self._logit_transform)
        logits = llm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                     use_cache=False, **self._attention_kwargs(position_ids, attention_mask)).logits
        return causal_lm_token_logps(logits[mask], targets[mask])  # the model's own logits

    @staticmethod
    def per_sequence(values: torch.Tensor, at: torch.Tensor, sequence_index: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of ``values`` per sequence, their number): ``values`` belong to the positions ``at``."""
        sequences = sequence_index[at]
        count = int(sequence_index.max()) + 1
        sums = torch.zeros(count, dtype=torch.float32, device=values.device).index_add(0, sequences, values)
        return sums, torch.bincount(sequences, minlength=count).to(torch.float32)

    def sequence_logps(self, llm: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       position_ids: torch.Tensor | None, sequence_index: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probability of each sequence's labelled tokens, their number), each of shape (sequences,)."""
        targets = shifted_targets(labels)
        values = self.token_logps(llm, input_ids, targets, position_ids, attention_mask)
        return self.per_sequence(values, targets != IGNORE_INDEX, sequence_index)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **batch: Any) -> dict[str, Any]:
        sequence_index = pair_sequence_index(self, batch)
        # the reference first: its pass is over (its buffers freed) before the policy's graph is built
        ref = self.reference_logps(input_ids, labels, position_ids, sequence_index, attention_mask)
        logps, lengths = self.sequence_logps(self.llm, input_ids, labels, position_ids, sequence_index,
                                             attention_mask)
        terms, metrics = self.pair_loss(logps, lengths, ref)
        return pair_outputs(terms, metrics, labels, sequence_index)

    def reference_logps(self, input_ids, labels, position_ids, sequence_index, attention_mask) -> torch.Tensor | None:
        """The reference model's summed log-probability of each sequence (None: the loss needs none)."""
        return None

    def pair_loss(self, logps, lengths, ref):
        """``(loss_terms, metrics)`` of the sequences' summed log-probabilities (and the reference's): per-pair
        sums; ``loss_terms`` maps a unit (``pairs``, ``chosen_tokens``) to the sum to divide by the step's count
        of it."""
        raise NotImplementedError

    @staticmethod
    def _reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
        """TRL's names: the sums over the pairs (the loop divides by the step's pairs)."""
        return {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
                "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
                "logps/chosen": chosen_logps.sum(), "logps/rejected": rejected_logps.sum()}


class DPO(PreferenceModel):
    """Direct Preference Optimization against a frozen reference model.

    ``loss_type``: ``sigmoid`` (DPO; ``label_smoothing`` > 0 gives conservative DPO), ``robust``, ``hinge``,
    ``ipo`` (on per-token averages), ``sppo_hard``, ``nca_pair``, ``bco_pair``, and XTuner's ``kto_pair`` (its KL
    terms are means over the micro-batch, so only that one loss depends on how pairs are batched).

    The reference: with LoRA/QLoRA the base model with its adapters disabled (no second copy); ``ref_llm`` a
    separate model (or its config), frozen; otherwise a frozen copy of the model as it starts.
    ``precompute_ref_log_probs=True``: the reference log-probability of every training sequence is computed once
    before training (``precompute_reference``, which the Runner calls), so no reference model is resident and no
    reference pass runs during training; with full fine-tuning the reference is then the model as it starts.
    """

    def __init__(self, llm: Any, ref_llm: Any = None, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, precompute_ref_log_probs: bool = False, **kwargs: Any) -> None:
        if loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(f"model.loss_type={loss_type!r} is not one of {list(DPO_LOSS_TYPES)}")
        if not 0.0 <= float(label_smoothing) < 0.5:
            raise ConfigError(f"model.label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
        super().__init__(llm, beta=beta, **kwargs)
        self.loss_type, self.label_smoothing = loss_type, float(label_smoothing)
        self.precompute_ref_log_probs = bool(precompute_ref_log_probs)
        self.reference_table: dict[bytes, float] | None = None  # sequence -> reference log-prob, when precomputed
        if ref_llm is not None:
            if not (isinstance(ref_llm, nn.Module) or is_type_dict(ref_llm)):
                raise ConfigError("model.ref_llm must be a model or its dict(type=...) config")
            ref, _ = build_llm(ref_llm, kwargs.get("max_position_embeddings"), self.device,
                               kwargs.get("use_varlen_attn", False))
            self.ref_llm = _frozen(ref)
        elif self.use_lora or self.precompute_ref_log_probs:
            self.ref_llm = None  # the adapters disabled, or the model itself before training (precomputed)
        else:
            self.ref_llm = _frozen(copy.deepcopy(self.llm))

    def reference_logps(self, input_ids, labels, position_ids, sequence_index, attention_mask) -> torch.Tensor:
        if self.precompute_ref_log_probs:
            if self.reference_table is None:
                raise ConfigError("precompute_ref_log_probs=True: the reference log-probabilities were not computed "
                                  "(the Runner does it before training; call precompute_reference(dataloader))")
            try:
                values = [self.reference_table[key] for key in sequence_keys(input_ids, labels, sequence_index)]
            except KeyError:
                raise ConfigError("a training sequence has no precomputed reference log-probability: the batches "
                                  "must come from the dataloader given to precompute_reference") from None
            return torch.tensor(values, dtype=torch.float32, device=input_ids.device)
        return self._reference_pass(input_ids, labels, position_ids, sequence_index, attention_mask)

    def precompute_reference(self, dataloader, device: torch.device | str | None = None, rows: int = 8,
                             cache_file: str | os.PathLike | None = None) -> tuple[int, bool]:
        """Compute the reference log-probability of every sequence of ``dataloader``'s dataset (rows batched by
        its collate function; the ranks of a distributed run share the work) with the model as it is now, which
        must be the reference: before training (and before a checkpoint's weights are loaded). With
        ``cache_file``, a table saved there before is loaded instead, and a computed one is saved there (by rank
        0, atomically). Returns (the number of sequences, whether the table was loaded)."""
        import torch.distributed as dist

        from lmtune.core.dist import get_rank, get_world_size

        if cache_file is not None and os.path.isfile(cache_file):
            saved = torch.load(cache_file, weights_only=True)
            self.reference_table = dict(zip(saved["keys"], saved["values"].tolist()))
            return len(self.reference_table), True

        dataset, collate = dataloader.dataset, dataloader.collate_fn
        rank, world = get_rank(), get_world_size()
        mine = list(range(rank, len(dataset), world))
        table: dict[bytes, float] = {}
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(mine), rows):
                batch = collate([dataset[i] for i in mine[start:start + rows]])
                batch = {k: v.to(device) if torch.is_tensor(v) and device is not None else v for k, v in batch.items()}
                ref = self._reference_pass(batch["input_ids"], batch["labels"], batch.get("position_ids"),
                                           batch[SEQUENCE_INDEX], batch.get("attention_mask"))
                keys = sequence_keys(batch["input_ids"], batch["labels"], batch[SEQUENCE_INDEX])
                table.update(zip(keys, ref.tolist()))
        finally:
            self.train(was_training)
        if world > 1:
            parts: list[dict] = [{} for _ in range(world)]
            dist.all_gather_object(parts, table)
            table = {k: v for part in parts for k, v in part.items()}
        self.reference_table = table
        if cache_file is not None and rank == 0:
            keys = list(table)
            tmp = f"{cache_file}.{os.getpid()}.tmp"
            os.makedirs(os.path.dirname(os.fspath(cache_file)) or ".", exist_ok=True)
            torch.save({"keys": keys, "values": torch.tensor([table[k] for k in keys], dtype=torch.float64)}, tmp)
            os.replace(tmp, cache_file)
        return len(table), False

    def _reference_pass(self, input_ids, labels, position_ids, sequence_index, attention_mask) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_llm is not None:
                return self.sequence_logps(self.ref_llm, input_ids, labels, position_ids, sequence_index,
                                           attention_mask)[0]
            # LoRA: the base model with the adapters disabled; else (precomputing) the model before training
            with self.llm.disable_adapter() if self.use_lora else contextlib.nullcontext():
                return self.sequence_logps(self.llm, input_ids, labels, position_ids, sequence_index,
                                           attention_mask)[0]

    def pair_loss(self, logps, lengths, ref):
        chosen, rejected, ref_chosen, ref_rejected = logps[0::2], logps[1::2], ref[0::2], ref[1::2]
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        delta = chosen_ratio - rejected_ratio
        beta, smoothing = self.beta, self.label_smoothing
        kind = self.loss_type
        if kind == "sigmoid":
            losses = -F.logsigmoid(beta * delta) * (1 - smoothing) - F.logsigmoid(-beta * delta) * smoothing
        elif kind == "robust":
            losses = (-F.logsigmoid(beta * delta) * (1 - smoothing)
                      + F.logsigmoid(-beta * delta) * smoothing) / (1 - 2 * smoothing)
        elif kind == "hinge":
            losses = torch.relu(1 - beta * delta)
        elif kind == "ipo":  # on per-token averages, as the IPO authors compute it
            average = chosen_ratio / lengths[0::2].clamp(min=1) - rejected_ratio / lengths[1::2].clamp(min=1)
            losses = (average - 1 / (2 * beta)) ** 2
        elif kind == "sppo_hard":
            losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
        elif kind == "nca_pair":
            losses = (-F.logsigmoid(beta * chosen_ratio) - 0.5 * F.logsigmoid(-beta * chosen_ratio)
                      - 0.5 * F.logsigmoid(-beta * rejected_ratio))
        elif kind == "bco_pair":
            losses = -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
        else:  # kto_pair: the KL of each side estimated from the other side's mean over the micro-batch
            chosen_kl, rejected_kl = chosen_ratio.mean().clamp(min=0), rejected_ratio.mean().clamp(min=0)
            losses = ((1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl)))
                      + (1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio)))) / 2
        metrics = self._reward_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach(),
                                       chosen.detach(), rejected.detach())
        return {"pairs": losses.sum()}, metrics


class SimPO(PreferenceModel):
    """SimPO: no reference model; the margin of per-token average log-probabilities, less ``gamma``
    (TRL's CPO trainer with ``loss_type='simpo'``: ``simpo_gamma``, and ``cpo_alpha`` times the chosen
    responses' NLL; SimPO itself uses ``cpo_alpha=0``)."""

    def __init__(self, llm: Any, beta: float = 2.0, gamma: float = 0.5, cpo_alpha: float = 0.0,
                 label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(llm, beta=beta, **kwargs)
        self.gamma, self.cpo_alpha, self.label_smoothing = float(gamma), float(cpo_alpha), float(label_smoothing)

    def pair_loss(self, logps, lengths, ref=None):
        average = logps / lengths.clamp(min=1)
        chosen, rejected = average[0::2], average[1::2]
        margin = self.beta * (chosen - rejected) - self.gamma
        losses = -F.logsigmoid(margin) * (1 - self.label_smoothing) - F.logsigmoid(-margin) * self.label_smoothing
        terms = {"pairs": losses.sum()}
        if self.cpo_alpha:
            terms["chosen_tokens"] = -self.cpo_alpha * logps[0::2].sum()
        return terms, self._reward_metrics(self.beta * chosen.detach(), self.beta * rejected.detach(),
                                           chosen.detach(), rejected.detach())


class ORPO(PreferenceModel):
    """ORPO: the chosen responses' NLL (a mean over their tokens) less ``beta`` times the mean log-sigmoid of
    the log odds ratio of the per-token average log-probabilities; no reference model.

    ``nll_on_prompt``: the NLL over the chosen sequences' prompts too, as TRL's ``ORPOTrainer`` computes it;
    off by default, as in XTuner and the ORPO paper's supervised term (the response only).
    """

    def __init__(self, llm: Any, beta: float = 0.1, nll_on_prompt: bool = False, **kwargs: Any) -> None:
        super().__init__(llm, beta=beta, **kwargs)
        self.nll_on_prompt = bool(nll_on_prompt)

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, **batch):
        if not self.nll_on_prompt:
            return super().forward(input_ids, labels, position_ids, attention_mask, **batch)
        # one pass over every token of the chosen sequences and the responses of the rejected ones
        sequence_index = pair_sequence_index(self, batch)
        responses = shifted_targets(labels)
        chosen_ids = torch.arange(0, int(sequence_index.max()) + 1, 2, device=sequence_index.device)
        targets = torch.where(responses != IGNORE_INDEX, responses,
                              sequence_targets(input_ids, sequence_index, chosen_ids))
        values = self.token_logps(self.llm, input_ids, targets, position_ids, attention_mask)
        trained = targets != IGNORE_INDEX
        in_response = (responses != IGNORE_INDEX)[trained]
        logps, lengths = self.per_sequence(values[in_response], responses != IGNORE_INDEX, sequence_index)
        everything, _ = self.per_sequence(values, trained, sequence_index)
        terms, metrics = self.pair_loss(logps, lengths, nll=("chosen_all_tokens", -everything[0::2].sum()))
        return pair_outputs(terms, metrics, labels, sequence_index)

    def pair_loss(self, logps, lengths, ref=None, nll: tuple[str, torch.Tensor] | None = None):
        average = logps / lengths.clamp(min=1)
        chosen, rejected = average[0::2], average[1::2]
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        unit, nll = nll or ("chosen_tokens", -logps[0::2].sum())
        terms = {"pairs": -self.beta * ratio.sum(), unit: nll}
        metrics = self._reward_metrics(self.beta * chosen.detach(), self.beta * rejected.detach(),
                                       chosen.detach(), rejected.detach())
        metrics.update({"log_odds_ratio": ratio.detach().sum(), "log_odds_chosen": log_odds.detach().sum()})
        return terms, metrics


__all__ = ["DPO", "DPO_LOSS_TYPES", "ORPO", "PreferenceModel", "SimPO", "sequence_keys"]
