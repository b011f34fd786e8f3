"""Fine-tuning: LoRA training of a base model in plain torch autograd (a training task).

The serving forward (`flowserve.model.Llama`) runs under inference mode over a paged KV
cache and updates its residual stream in place, so training has its own dense forward here:
a batch of padded token rows, causal attention (right padding never reaches a real token),
the base's weights from `flowserve.weights` frozen (the fused wqkv and w_gate_up read as row
views per PEFT module, no copy) and a trainable LoRA pair on each target module, initialised
as PEFT does (A Kaiming-uniform, B zero) and scaled by alpha / r. The loss is the mean
cross-entropy over the tokens the example's mask counts (the assistant's,
`Tokenizer.encode_chat_for_training`); logits are computed for those rows only.

A training task is a process of its own (`python -m flowserve.train JOB_DIR`), started by the
fine-tuning JE (scheduler/fine_tuning.py) on a host the cluster placed it on. Its job
directory holds `spec.json` (`TrainSpec`) and `data.json` (tokenized train and eval
examples, from the JE's validation). It prints one JSON object a line on stdout: progress
events the JE records (`{"type": "metrics", "data": {"step", "train_loss", ...}}`), each
checkpoint (`{"checkpoint": step}`), and last `{"done": true}` with the validation loss and
the final checkpoint's directory (the adapter to deploy). Every
`checkpoint_steps` steps (and at the end) it writes `checkpoints/step-NNNNNN/`: the adapter
in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, what
`flowserve.lora.read_lora` and peft read) and `optimizer.pt`. A new task on the same
directory resumes from the newest checkpoint; the batches are a function of the step (each
epoch's order seeded by its number), so a resumed run computes what an unbroken one would.
One task runs per directory (an exclusive lock), and a task whose parent died (EOF on
stdin) exits at its next step. A line `threads N` on stdin sets its torch threads.
"""
import fcntl
import json
import math
import select
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from flowserve.config import ModelConfig
from flowserve.lora import CONFIG_FILE, MODULES, WEIGHTS_FILE, fused_slices, module_shape
from flowserve.model import apply_rope, rope_tables
from flowserve.weights import load_weights

Example = tuple[list[int], list[int]]  # token ids, and 1 where the loss counts


@dataclass
class TrainSpec:
    """A training task's settings: the job directory's spec.json, which scheduler/fine_tuning.py
    writes from the job's hyperparameters."""
    model_path: str
    n_epochs: int = 3
    batch_size: int = 4
    learning_rate: float = 2e-4
    rank: int = 8
    alpha: float = 16
    targets: list[str] = field(default_factory=lambda: list(MODULES))
    checkpoint_steps: int = 10
    seed: int = 0


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def batch_at(examples: list[Example], spec: TrainSpec, step: int) -> list[Example]:
    """The examples of training step `step` (from 0): epoch `step // steps_per_epoch`, in that
    epoch's seeded order."""
    per_epoch = steps_per_epoch(len(examples), spec.batch_size)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(spec.seed * 100003 + epoch))
    return [examples[j] for j in order[i * spec.batch_size:(i + 1) * spec.batch_size].tolist()]


class LoraTrainer:
    """The base model's dense forward with a LoRA pair on each target module of each layer."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], spec: TrainSpec):
        self.cfg, self.w, self.spec = cfg, weights, spec
        self.scale = spec.alpha / spec.rank
        first = fused_slices(cfg)
        self.base: dict[tuple[int, str], torch.Tensor] = {}
        for i in range(cfg.num_layers):
            for module, fused in MODULES.items():
                rows = module_shape(cfg, module)[0]
                self.base[i, module] = weights[f"layers.{i}.{fused}"][first[module]:first[module] + rows]
        torch.manual_seed(spec.seed)
        self.lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for i in range(cfg.num_layers):
            for module in spec.targets:
                out, inp = module_shape(cfg, module)
                a = torch.empty(spec.rank, inp)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's initialisation
                self.lora[i, module] = (a.requires_grad_(), torch.zeros(out, spec.rank, requires_grad=True))
        self.cos, self.sin = rope_tables(cfg, torch.device("cpu"))

    def params(self) -> list[torch.Tensor]:
        return [t for pair in self.lora.values() for t in pair]

    def linear(self, x: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        y = F.linear(x, self.base[layer, module])
        if (layer, module) in self.lora:
            a, b = self.lora[layer, module]
            y = y + F.linear(F.linear(x, a), b) * self.scale
        return y

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states [B, T, hidden] of token rows `ids` [B, T]."""
        cfg, w = self.cfg, self.w
        bsz, t = ids.shape
        cos, sin = self.cos[:t], self.sin[:t]
        h = F.embedding(ids, w["embed"])
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            x = F.rms_norm(h, (cfg.hidden_size,), w[p + "attn_norm"], cfg.rms_norm_eps)
            q = apply_rope(self.linear(x, i, "q_proj").view(bsz, t, cfg.num_heads, cfg.head_dim), cos, sin)
            k = apply_rope(self.linear(x, i, "k_proj").view(bsz, t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            v = self.linear(x, i, "v_proj").view(bsz, t, cfg.num_kv_heads, cfg.head_dim)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True)
            h = h + self.linear(o.transpose(1, 2).reshape(bsz, t, -1), i, "o_proj")
            x = F.rms_norm(h, (cfg.hidden_size,), w[p + "ffn_norm"], cfg.rms_norm_eps)
            act = F.silu(self.linear(x, i, "gate_proj")) * self.linear(x, i, "up_proj")
            h = h + self.linear(act, i, "down_proj")
        return F.rms_norm(h, (cfg.hidden_size,), w["norm"], cfg.rms_norm_eps)

    def loss(self, batch: list[Example]) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the counted tokens of `batch`, and their number."""
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in batch])
        mask = torch.tensor([m + [0] * (width - len(m)) for _, m in batch], dtype=torch.bool)
        counted = mask[:, 1:]  # position t's logits predict token t + 1
        hs = self.hidden(ids)[:, :-1][counted]
        logits = F.linear(hs, self.w.get("lm_head", self.w["embed"]))
        return F.cross_entropy(logits, ids[:, 1:][counted]), int(counted.sum())

    @torch.no_grad()
    def evaluate(self, examples: list[Example]) -> float:
        """Mean loss per counted token over `examples`."""
        total = count = 0
        for j in range(0, len(examples), self.spec.batch_size):
            loss, n = self.loss(examples[j:j + self.spec.batch_size])
            total, count = total + float(loss) * n, count + n
        return total / max(count, 1)


# -------------------------------------------------------------------- checkpoints (PEFT format)

def peft_keys(layer: int, module: str) -> tuple[str, str]:
    """The names of a module's LoRA A and B in PEFT's safetensors file."""
    part = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return tuple(f"base_model.model.model.layers.{layer}.{part}.{module}.lora_{ab}.weight" for ab in "AB")


def save_checkpoint(path: Path, trainer: LoraTrainer, optimizer: torch.optim.Optimizer) -> None:
    """The adapter as peft's `save_pretrained` writes it, plus the optimizer's state; written
    aside and renamed, so a task killed mid-write leaves no half checkpoint."""
    spec, tmp = trainer.spec, path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.detach().contiguous() for (i, module), pair in trainer.lora.items()
               for key, t in zip(peft_keys(i, module), pair)}
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
        "target_modules": spec.targets, "lora_dropout": 0.0, "bias": "none", "inference_mode": True}))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    tmp.rename(path)


def last_checkpoint(job_dir: Path) -> tuple[int, Path | None]:
    """The newest complete checkpoint's step and directory (0, None if there is none)."""
    done = sorted((job_dir / "checkpoints").glob("step-[0-9]*[0-9]"))
    return (int(done[-1].name[5:]), done[-1]) if done else (0, None)


def load_checkpoint(path: Path, trainer: LoraTrainer, optimizer: torch.optim.Optimizer) -> None:
    tensors = load_file(str(path / WEIGHTS_FILE))
    with torch.no_grad():
        for (i, module), pair in trainer.lora.items():
            for key, t in zip(peft_keys(i, module), pair):
                t.copy_(tensors[key])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt"))


# -------------------------------------------------------------------- the training task

def emit(event: dict) -> None:
    print(json.dumps(event), flush=True)


def obey_parent() -> None:
    """Between steps: exit if the parent is gone (EOF on stdin); take a new thread count."""
    while select.select([sys.stdin], [], [], 0)[0]:
        line = sys.stdin.readline()
        if not line:
            sys.exit(0)
        if line.startswith("threads "):
            torch.set_num_threads(int(line.split()[1]))


def run(job_dir: Path) -> None:
    spec = TrainSpec(**json.loads((job_dir / "spec.json").read_text()))
    data = json.loads((job_dir / "data.json").read_text())
    train = [tuple(e) for e in data["train"]]
    cfg, weights = load_weights(spec.model_path)
    trainer = LoraTrainer(cfg, weights, spec)
    optimizer = torch.optim.AdamW(trainer.params(), lr=spec.learning_rate, weight_decay=0.0)
    total = spec.n_epochs * steps_per_epoch(len(train), spec.batch_size)
    step, path = last_checkpoint(job_dir)
    if path:
        load_checkpoint(path, trainer, optimizer)
        emit({"type": "message", "message": f"Resumed from the checkpoint at step {step}", "data": {"step": step}})
    while step < total:
        obey_parent()
        t0 = time.perf_counter()
        loss, _ = trainer.loss(batch_at(train, spec, step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        emit({"type": "metrics", "message": f"Step {step}/{total}: training loss={loss.item():.3f}",
              "data": {"step": step, "total_steps": total, "train_loss": loss.item(),
                       "step_s": round(time.perf_counter() - t0, 3)}})
        if step % spec.checkpoint_steps == 0 or step == total:
            save_checkpoint(job_dir / "checkpoints" / f"step-{step:06d}", trainer, optimizer)
            emit({"checkpoint": step, "train_loss": loss.item()})
    emit({"phase": "evaluate"})
    valid = trainer.evaluate([tuple(e) for e in data["eval"]]) if data["eval"] else None
    emit({"valid_loss": valid, "done": True, "step": total, "adapter": str(last_checkpoint(job_dir)[1])})


def main() -> None:
    job_dir = Path(sys.argv[1])
    with open(job_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # an orphaned task on this job (its parent died) exits at its next step
        run(job_dir)


if __name__ == "__main__":
    main()
