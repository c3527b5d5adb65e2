"""PPO's value model: a causal LM body (no LM head) and a scalar head, V(s_t) for every completion token.

Why a separate model and not a second head on the policy: with a shared body, the value
regression's gradient flows into the policy's features, so the two losses compete for the same
weights and the value-loss coefficient becomes a knob that trades policy quality for value
accuracy (and whose right value moves with the reward's scale). A separate model decouples
them: each has its own optimizer state, learning rate and gradient clipping, and no coefficient
is needed. It costs a fourth model in memory (policy, reference, reward, value), the count
InstructGPT (Ouyang et al. 2022) has and the one the DPO chapter's comparison table states.
InstructGPT and TRL initialise the value model from the reward model (it already maps a text
to a score); without one it starts from the policy's body, with a zero head (V = 0 at the start).

Positions: the value of token t's state s_t = (prompt, a_<t) is read at the position that
predicts a_t, the same position whose hidden state the log-prob of a_t comes from, so the
packed and padded layouts of data.packing / data.batching serve values as they serve log-probs.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from prefalign.data.batching import pad_sequences
from prefalign.errors import UserError
from prefalign.logprobs import shifted_targets


class ValueModel(nn.Module):
    """body: a transformer without LM head (LlamaModel, Qwen2Model, ...); head: Linear(hidden, 1)."""

    def __init__(self, body: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.body = body
        weight = body.get_input_embeddings().weight                       # [V, H]
        if head is None:
            head = nn.Linear(weight.shape[1], 1, dtype=weight.dtype)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.head = head.to(weight.device)

    @property
    def config(self):
        return self.body.config

    def forward(self, input_ids: Tensor, attention_mask, position_ids: Tensor | None, src: Tensor) -> Tensor:
        """Values at the flat positions src of the [R, L] batch: [N] fp32."""
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [R, L, H]
        flat = hidden.reshape(-1, hidden.shape[-1])[src]                   # [N, H]
        return self.head(flat).squeeze(-1).float()


def value_source(value_model: str, rewards: list) -> str:
    """Where the value model starts: --value-model, else the first rm:PATH reward's model, else ''."""
    if value_model:
        return value_model
    from prefalign.reward_model import parse_spec  # rm:PATH#label=K: the folder is PATH

    return next((parse_spec(r[3:])[0] for r in rewards if isinstance(r, str) and r.startswith("rm:")), "")


def build_value_model(source: str, policy, tokenizer) -> ValueModel:
    """A ValueModel from the policy's body (source '') or from a model folder: a reward model saved
    as AutoModelForSequenceClassification keeps its one-output score head; any other model
    (a causal LM) gives its body and a zero head."""
    if not source:
        return ValueModel(copy.deepcopy(policy.base_model))
    from transformers import AutoModelForSequenceClassification

    from prefalign import models

    models._check_source(source, "value model")
    try:
        with models.quiet_third_party():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=1, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as e:
        raise UserError(f"value model {source}: cannot be loaded ({str(e).splitlines()[0]})") from None
    models.check_vocab(tokenizer, model, source)
    head = getattr(model, "score", None)
    # A head of other than one output (a classifier of 2+ labels) is no value head: start it at zero.
    fresh = list(info.get("missing_keys", [])) + [k[0] for k in info.get("mismatched_keys", [])]
    trained = isinstance(head, nn.Linear) and not any(k.startswith("score.") for k in fresh)
    if trained and head.bias is None:  # HF's score heads have no bias; ours may learn an offset
        new = nn.Linear(head.in_features, 1, dtype=head.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(head.weight)
            new.bias.zero_()
        head = new
    return ValueModel(model.base_model, head if trained else None)


def _packed_mask(body: nn.Module, packed, device: torch.device):
    """The packed batch's 4D mask in the form the body's attention consumes (as data.packing's
    attention_mask_for, which reads the dtype from an LM head this model does not have)."""
    impl = getattr(body.config, "_attn_implementation", None) or "eager"
    if impl == "flex_attention":
        return packed.block_mask(device)
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
        else body.get_input_embeddings().weight.dtype
    return packed.attention_mask(dtype).to(device)


def completion_token_values(value: ValueModel, prompt_ids: list[list[int]], completion_ids: list[list[int]], *,
                            pad_id: int, packing: bool = False, token_budget: int = 0) -> Tensor:
    """V(s_t) for every completion token: [B, Tc] fp32, 0 after each completion's end (the layout
    of grpo.completion_token_logps, whose packed and padded paths it mirrors)."""
    device = next(value.parameters()).device
    if packing:
        from prefalign.data.packing import pack_groups

        try:
            packed = pack_groups(prompt_ids, completion_ids, token_budget)
        except ValueError as e:  # a segment longer than token_budget
            raise UserError(f"ppo: {e}") from None
        flat = value(packed.input_ids.to(device), _packed_mask(value.body, packed, device),
                     packed.position_ids.to(device), packed.src.to(device))  # [N], packed order
        flat = flat[torch.argsort(packed.seq.to(device), stable=True)]       # each completion's tokens in order
    else:
        batch = pad_sequences(prompt_ids, completion_ids, pad_id)
        scored, _ = shifted_targets(batch.labels)                              # [B, L-1]
        rows, cols = scored.nonzero(as_tuple=True)                             # row-major: completions in order
        src = (rows * batch.input_ids.shape[1] + cols).to(device)
        flat = value(batch.input_ids.to(device), batch.attention_mask.to(device), None, src)
    lengths = torch.tensor([len(c) for c in completion_ids], device=device)
    mask = torch.arange(int(lengths.max()), device=device)[None, :] < lengths[:, None]  # [B, Tc]
    return flat.new_zeros(mask.shape).masked_scatter(mask, flat)
