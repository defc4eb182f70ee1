"""Fine-tuning a copy of the audited model: the trainable copy, its LoRA targets, its data.

The loss is the standard causal-LM SFT loss on chat-formatted pairs: the prompt is formatted
exactly as generation formats it (the tokenizer's chat template with the generation prompt), the
completion follows with the template's end-of-turn token (omitted when the completion was cut at
``completion_tokens``, so the model is not taught to stop mid-sentence), and only completion
tokens carry loss (token mean over the batch). The optimiser (AdamW without weight decay, or
SGD) runs at a constant learning rate with gradient-norm clipping at 1.0.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from typing import Any

import torch

from ...errors import UserError
from ...training import Example, encode_pair, token_nll
from .config import TAMPER_VERSION, TamperConfig
from ...models.memory import free_memory, retry_smaller
from .pairs import Pair

CLIP_NORM = 1.0


def attack_key(cfg: TamperConfig, pairs_sha: str, targets: list[str] | None,
               system: str | None) -> str:
    """Hash of everything that determines the weights after s steps (not the step list, not
    the evaluation settings)."""
    blob = json.dumps({
        "v": TAMPER_VERSION, "pairs": pairs_sha, "n": cfg.n_examples, "method": cfg.method,
        "lr": cfg.lr, "batch": cfg.batch_size, "rank": cfg.rank, "alpha": cfg.alpha,
        "dropout": cfg.dropout, "targets": targets if cfg.method == "lora" else None,
        "optimizer": cfg.optimizer, "control": cfg.control, "seed": cfg.seed,
        "completion_tokens": cfg.completion_tokens, "system": system,
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_targets(model) -> list[str]:
    """Full names of every Linear (or GPT-2 Conv1D) inside the decoder blocks."""
    from ...models.arch import locate_parts

    parts = locate_parts(model)
    names = []
    for name, m in parts.blocks.named_modules():
        if isinstance(m, torch.nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf")):
            names.append(f"{parts.block_path}.{name}")
    if not names:
        raise UserError("tamper: no Linear layers found inside the decoder blocks; pass target_modules")
    return names


def leaf_names(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def sft_examples(tok, used: list[Pair], system: str | None,
                 completion_tokens: int) -> list[Example]:
    """The pairs tokenised for SFT, each prompt exactly as generation formats it."""
    examples = []
    for pr in used:
        p_ids, c_ids = encode_pair(tok, pr.prompt, pr.completion, system=system,
                                   end_of_turn=not pr.truncated,
                                   max_completion_tokens=completion_tokens)
        examples.append(Example(p_ids + c_ids, len(p_ids)))
    return examples


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


class TrainableCopy:
    """A trainable copy of the audited model and its optimiser."""

    def __init__(self, lm, cfg: TamperConfig, targets: list[str] | None):
        from ...models.loader import LoadedModel

        model = copy.deepcopy(lm.model)
        if cfg.method == "lora":
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:  # pragma: no cover - peft is a dependency
                raise UserError("LoRA needs peft: pip install peft") from None
            lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=targets, bias="none", task_type="CAUSAL_LM")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = get_peft_model(model, lcfg)
            except ValueError as e:
                raise UserError(f"tamper: LoRA target_modules {cfg.target_modules} do not match "
                                f"this model ({str(e).splitlines()[0][:200]})") from None
            self.target_names = [n for n, m in model.named_modules() if hasattr(m, "lora_A")
                                 and len(getattr(m, "lora_A", {})) > 0]
        else:
            for p in model.parameters():
                p.requires_grad_(True)
            self.target_names = None
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.params)
        if cfg.optimizer == "adamw":
            self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        else:
            self.opt = torch.optim.SGD(self.params, lr=cfg.lr)
        self.steps_taken = 0
        self.lm = LoadedModel(model, lm.tokenizer, lm.spec, dict(lm.info))
        model.eval()

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimiser step on the token-mean NLL of ``batch``. A batch that runs out of
        memory is run again as micro-batches whose gradients add up to the whole batch's (each
        part's NLL sum over the whole batch's token count): the same step, only slower."""
        self.model.train()
        b = batch["input_ids"].shape[0]
        n_all = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)

        def attempt(size: int) -> torch.Tensor:
            self.opt.zero_grad(set_to_none=True)  # a failed attempt may have left gradients
            total = torch.zeros((), device=n_all.device)
            for a in range(0, b, size):
                s, _ = token_nll(self.model, {k: v[a:a + size] for k, v in batch.items()},
                                 share_prefix=True)
                part = s.sum() / n_all
                part.backward()
                total = total + part.detach()
            return total

        loss = retry_smaller("fine-tuning", self.model, b, attempt)
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.opt.step()
        self.steps_taken += 1
        self.model.eval()
        return float(loss.detach())

    def facts(self, targets: list[str] | None) -> dict[str, Any]:
        """What the set-up found, stored with each checkpoint so that a resume can report it."""
        names = self.target_names if self.target_names is not None else targets
        return {"n_trainable": self.n_trainable,
                "n_targets": len(names) if names is not None else None,
                "target_leaves": leaf_names(names) if names is not None else None}

    def close(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        del self.opt, self.params, self.model, self.lm
        free_memory()


def fork_rng(device):
    devices = []
    if getattr(device, "type", str(device)) == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    return torch.random.fork_rng(devices=devices)
