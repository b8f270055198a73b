"""The LM head applied only where it is needed.

``model(**batch).loss`` and ``.logits`` run the LM head (hidden -> vocabulary, 49,152 columns for
SmolLM2) at every position of every sequence, although fine-tuning and scoring use a handful of
answer positions. Here the decoder runs alone, the hidden states of the scored positions are
gathered, and the head (and log-softmax) runs on those rows only. Where every position counts
(stage 1's LM loss) the head runs in chunks of rows, so a (batch, length, vocab) tensor never
exists whole.

Works for any ``*ForCausalLM`` of transformers whose ``base_model`` returns the hidden states the
head takes (Llama, GPT-2, OPT, ...), peft-wrapped or not; Gemma-style final logit soft-capping is
applied when the config asks for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .devices import autocast_for

CHUNK_ROWS = 1024
"""Rows of hidden states sent through the head at once where every position is scored."""


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a (possibly peft-wrapped) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden states, ``(batch, length, hidden)``, without the LM head.

    ``attention_mask`` is a ``(batch, length)`` padding mask or a ready ``(batch, 1, length,
    length)`` one (see :mod:`scaleot_fed.packing`); ``position_ids`` default to ``0..length-1``.
    """
    backbone = _causal_lm(model).base_model
    extra = {} if position_ids is None else {"position_ids": position_ids}
    with autocast_for(model):
        return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).last_hidden_state


def head_logits(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """Logits of ``rows`` = ``(n, hidden)`` hidden states: ``(n, vocab)``, in float32."""
    lm = _causal_lm(model)
    with autocast_for(model):
        logits = lm.get_output_embeddings()(rows).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def scored_positions(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Where next-token targets are scored: ``(batch_idx, pos)`` of the positions whose *next*
    label is not ``ignore_index``, and those targets. ``labels`` is ``(batch, length)``."""
    targets = labels[:, 1:]  # (batch, length-1): the token each position predicts
    batch_idx, pos = (targets != ignore_index).nonzero(as_tuple=True)
    return torch.stack([batch_idx, pos]), targets[batch_idx, pos]


def answer_token_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the labelled tokens (what ``model(..., labels=labels).loss`` is),
    with the head run on those positions only. Returns the loss and the number of tokens."""
    hidden = hidden_states(model, input_ids, attention_mask)  # (batch, length, hidden)
    where, targets = scored_positions(labels.to(hidden.device), ignore_index)
    rows = hidden[where[0], where[1]]  # (n_scored, hidden)
    return F.cross_entropy(head_logits(model, rows), targets), int(targets.numel())


def target_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    where: torch.Tensor, targets: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities of ``targets`` at ``where`` = ``(2, n)`` (batch index, position):
    ``(n,)`` in float32, the head and log-softmax run on those ``n`` rows only."""
    hidden = hidden_states(model, input_ids, attention_mask, position_ids)
    rows = hidden[where[0], where[1]]  # (n, hidden)
    logprobs = torch.log_softmax(head_logits(model, rows), dim=-1)  # (n, vocab)
    return logprobs.gather(1, targets[:, None]).squeeze(1)


def _chunk_loss(model: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_logits(model, rows), targets, reduction="sum")


def lm_loss(model: nn.Module, input_ids: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean next-token loss of ``(batch, length)`` token ids, every position scored, the head
    run ``chunk_rows`` rows at a time. With gradients, each chunk's logits are recomputed in the
    backward pass instead of kept, so at most one chunk's (rows, vocab) logits exist at a time."""
    hidden = hidden_states(model, input_ids)[:, :-1]  # (batch, length-1, hidden)
    rows = hidden.reshape(-1, hidden.shape[-1])  # (batch*(length-1), hidden)
    targets = input_ids[:, 1:].reshape(-1).to(rows.device)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_rows):
        chunk = slice(start, start + chunk_rows)
        if torch.is_grad_enabled() and rows.requires_grad:
            part = torch.utils.checkpoint.checkpoint(_chunk_loss, model, rows[chunk], targets[chunk],
                                                     use_reentrant=False)
        else:
            part = _chunk_loss(model, rows[chunk], targets[chunk])
        total = total + part
    return total / targets.numel()
