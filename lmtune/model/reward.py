"""``RewardModel``: a causal LM's decoder with a scalar head, trained on preference pairs (Bradley–Terry).

Each sequence of a pair ends with the reward token (``build_preference_dataset(is_reward=True, ...)``); the
score is the head's output on the final hidden state at that token. The loss of a pair is
``-log sigmoid(score_chosen - score_rejected)`` (``loss_type='ranking'``; ``'focal'`` down-weights pairs already
ranked with confidence) plus ``penalty_weight`` times a penalty keeping scores small (``'log_barrier'`` inside
(-5, 5), ``'L2'``, or ``'none'``), XTuner's definitions. The head is a bias-free ``Linear(hidden_size, 1)``
starting at zero: it is exactly the ``score`` layer of transformers' ``*ForSequenceClassification`` with
``num_labels=1``, so ``lmtune convert`` exports a standard sequence-classification model (scoring the last
token, which is the reward token when the input ends with it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtune.core.constants import IGNORE_INDEX
from lmtune.core.errors import ConfigError
from lmtune.model.preference import pair_outputs, pair_sequence_index
from lmtune.model.sft import SupervisedFinetune

LOSS_TYPES = ("ranking", "focal")
PENALTY_TYPES = ("log_barrier", "L2", "none")


class RewardModel(SupervisedFinetune):
    """A reward model from a causal LM or its decoder alone (``llm``: ``AutoModelForCausalLM`` or
    ``AutoModel``; ``lora`` and quantization as in ``SupervisedFinetune``)."""

    def __init__(self, llm: Any, lora: Any = None, reward_token_id: int | None = None, loss_type: str = "ranking",
                 penalty_type: str = "log_barrier", penalty_weight: float = 0.01, **kwargs: Any) -> None:
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"model.loss_type={loss_type!r} is not one of {list(LOSS_TYPES)}")
        if penalty_type not in PENALTY_TYPES:
            raise ConfigError(f"model.penalty_type={penalty_type!r} is not one of {list(PENALTY_TYPES)}")
        super().__init__(llm, lora=lora, **kwargs)
        self.reward_token_id = reward_token_id
        self.loss_type, self.penalty_type, self.penalty_weight = loss_type, penalty_type, float(penalty_weight)
        hidden = self._base_model().config.get_text_config().hidden_size
        self.v_head = nn.Linear(hidden, 1, bias=False, device=self.llm.get_input_embeddings().weight.device)
        nn.init.zeros_(self.v_head.weight)
        # the LM head scores nothing: frozen, so that it is neither trained nor waited for by DDP (an untied head
        # would get no gradient); a head tied to the input embeddings stays as it is
        base = self._base_model()
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if isinstance(head, nn.Module) and getattr(head, "weight", None) is not base.get_input_embeddings().weight:
            for param in head.parameters():
                param.requires_grad_(False)

    def sequence_classifier(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The trained model as transformers' ``*ForSequenceClassification`` (``num_labels=1``; LoRA merged): its
        decoder's weights, and the head as its ``score`` layer. It scores the last non-pad token of its input."""
        import copy

        from transformers import AutoModelForSequenceClassification

        llm = self.llm.merge_and_unload() if self.use_lora else self.llm
        causal = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        config = copy.deepcopy(causal.config)
        config.num_labels, config.reward_token_id = 1, self.reward_token_id
        config.architectures = None
        try:
            classifier = AutoModelForSequenceClassification.from_config(config, dtype=dtype or torch.float32)
        except ValueError as exc:
            raise ConfigError(f"transformers has no sequence-classification class for {type(causal).__name__}: "
                              f"the reward model cannot be exported in that format ({exc})") from None
        decoder = getattr(causal, getattr(causal, "base_model_prefix", "model"), causal)
        target = getattr(classifier, classifier.base_model_prefix)
        missing, unexpected = target.load_state_dict(decoder.state_dict(), strict=False)
        if missing or unexpected:
            raise ConfigError(f"the decoder of {type(causal).__name__} does not fit {type(classifier).__name__}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            classifier.score.weight.copy_(self.v_head.weight.to(classifier.score.weight.dtype))
        return classifier.to(dtype) if dtype is not None else classifier

    def final_hidden(self, input_ids, position_ids, attention_mask) -> torch.Tensor:
        """The final hidden states (after the last norm) of every position."""
        base = self._base_model()
        has_head = isinstance(getattr(base, "get_output_embeddings", lambda: None)(), nn.Module)
        if has_head:
            found = self._final_hidden(self.llm, input_ids, position_ids, attention_mask)
            if found is not None:
                return found[0]
        out = self.llm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                       use_cache=False, output_hidden_states=has_head,
                       **self._attention_kwargs(position_ids, attention_mask))
        # a decoder without its LM head (AutoModel, as POLAR's configs load it) returns the states itself
        return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]

    def scores(self, input_ids, labels, position_ids=None, sequence_index=None, attention_mask=None) -> torch.Tensor:
        """The score of each sequence (shape (sequences,)), read at its labelled (reward) token."""
        hidden = self.final_hidden(input_ids, position_ids, attention_mask)
        at = labels != IGNORE_INDEX
        values = self.v_head(hidden[at].to(self.v_head.weight.dtype)).squeeze(-1).float()
        if sequence_index is None:
            return values
        order = torch.argsort(sequence_index[at])
        if not torch.equal(sequence_index[at][order], torch.arange(len(order), device=order.device)):
            raise ConfigError("each sequence of a reward batch needs exactly one labelled token (its reward "
                              "token): build the dataset with build_preference_dataset(is_reward=True, ...)")
        return values[order]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **batch: Any) -> dict[str, Any]:
        sequence_index = pair_sequence_index(self, batch)
        scores = self.scores(input_ids, labels, position_ids, sequence_index, attention_mask)
        chosen, rejected = scores[0::2], scores[1::2]
        losses = -F.logsigmoid(chosen - rejected)
        if self.loss_type == "focal":
            confidence = 2 * torch.relu(torch.sigmoid(chosen - rejected) - 0.5)
            losses = (1 - confidence) ** 2 * losses
        if self.penalty_type == "log_barrier":
            bounded = torch.stack([chosen, rejected]).clamp(-5 + 1e-3, 5 - 1e-3)
            losses = losses + self.penalty_weight * (-torch.log(5 - bounded) - torch.log(bounded + 5)).sum(0)
        elif self.penalty_type == "L2":
            losses = losses + self.penalty_weight * (chosen ** 2 + rejected ** 2)
        c, r = chosen.detach(), rejected.detach()
        metrics = {"rewards/chosen": c.sum(), "rewards/rejected": r.sum(),
                   "rewards/accuracies": (c > r).float().sum(), "rewards/margins": (c - r).sum()}
        return pair_outputs({"pairs": losses.sum()}, metrics, labels, sequence_index)


__all__ = ["LOSS_TYPES", "PENALTY_TYPES", "RewardModel"]
