"""Throughput of a training run: tokens/s, pairs/s and an MFU estimate.

* Tokens are the work a step must do, whatever the layout: the real tokens of prompt+chosen and
  prompt+rejected of every pair (no padding; a prompt shared by packing still counts twice),
  `pair_tokens`.
* FLOPs per token (`flops_per_token`): 6N for full fine-tuning (forward 2N, backward 4N), 4N with
  LoRA/QLoRA (the frozen base gets no weight gradients: forward 2N plus the input-gradient
  backward 2N; the adapters' own FLOPs are left out), plus 2N when the step runs the reference
  forward (an online reference; a precomputed one is its own phase, not counted here). N counts
  the weights used in matmuls per token (`matmul_params`): every linear layer's in × out, the LM
  head included (a tied embedding counts once, as the head), the input embedding excluded (a
  lookup), norms and biases left out. Attention-score FLOPs (QKᵀ and the weighted sum over the
  context) and an activation-checkpointing recompute are not counted: this is the model FLOPs
  utilisation, as in the PaLM paper's MFU, of a dense model (a mixture-of-experts counts every
  expert's weights, so its MFU is overstated).
* MFU = FLOPs per token × tokens/s ÷ the peak of all the run's devices (`device_peak`: a GPU's
  dense peak by name and dtype, a CPU's matmul rate measured once per process; unknown → no MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hardware import Peak, cpu_matmul_peak, cpu_model, gpu_dense_peak_tflops


def matmul_params(model: torch.nn.Module) -> int:
    """N: the weights a token passes through in matmuls. Linear layers (LoRA's own A/B matrices
    excluded; a 4-bit layer counted by its logical in × out) and any other matrix (ndim ≥ 2, e.g.
    GPT-2's Conv1D or fused expert weights) not owned by one, the input embedding excluded. A tied
    LM head is a Linear whose weight is the embedding's: counted once, as the head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings()
    counted: set[int] = set()
    total = 0
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            total += module.in_features * module.out_features
            counted.add(id(module.weight))
    skip = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    for name, p in base.named_parameters():
        if p.ndim >= 2 and id(p) not in counted and id(p) not in skip and "lora_" not in name:
            total += p.numel()
    return total


def flops_per_token(n_params: int, mode: str, online_reference: bool) -> int:
    """Model FLOPs per trained token: 6N (full) or 4N (lora, qlora), plus 2N for an online reference."""
    trained = 4 if mode in ("lora", "qlora") else 6
    return (trained + (2 if online_reference else 0)) * n_params


def pair_tokens(dataset) -> torch.Tensor:
    """Each row's tokens, 2·prompt + chosen + rejected, indexed by the split's row (a batch's "index")."""
    lengths = [2 * len(p) + len(c) + len(r) for p, c, r in
               zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]
    return torch.tensor(lengths, dtype=torch.long)


def device_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """One device's dense matmul peak for a run in `dtype`: on CUDA the table's (float32 counts as
    TF32 when torch lets matmuls use it), on a CPU the rate measured once per process."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        if name == "fp32" and torch.get_float32_matmul_precision() != "highest":
            name = "tf32"
        tflops = gpu_dense_peak_tflops(gpu, name)
        if tflops is None:
            return Peak(None, f"unknown: no dense {name} peak for {gpu} in alphadpo_cli.hardware.DENSE_PEAK_TFLOPS")
        return Peak(tflops * 1e12, f"{gpu} dense {name} peak ({tflops:g} TFLOP/s, data sheet)")
    if device.type == "cpu":
        return cpu_matmul_peak(name)
    return Peak(None, f"unknown: no peak for a {device.type} device")


@dataclass(frozen=True)
class Throughput:
    """What turns a tokens/s into an MFU: FLOPs per token and the run's peak (all its processes)."""

    n_params: int
    flops_per_token: int
    peak_flops: float | None  # one device's peak × the run's processes; None: no MFU
    peak_source: str
    formula: str  # "4N (LoRA) + 2N (online reference)", for the card

    def mfu(self, tokens_per_second: float) -> float | None:
        if not self.peak_flops:
            return None
        return self.flops_per_token * tokens_per_second / self.peak_flops

    def to_dict(self) -> dict:
        return {"n_params": self.n_params, "flops_per_token": self.flops_per_token, "peak_flops": self.peak_flops,
                "peak_source": self.peak_source, "formula": self.formula}


def run_throughput(policy: torch.nn.Module, *, mode: str, online_reference: bool, device: torch.device,
                   dtype: torch.dtype, processes: int) -> Throughput:
    """The run's `Throughput`: N of the policy (unwrapped), its FLOPs per token, its devices' peak."""
    n = matmul_params(policy)
    peak = device_peak(device, dtype)
    formula = ("4N (LoRA: no weight gradients of the frozen base)" if mode in ("lora", "qlora")
               else "6N (full fine-tuning)") + (" + 2N (reference forward in the step)" if online_reference else "")
    source = peak.source + (f", × {processes} processes" if processes > 1 and peak.flops else "")
    return Throughput(n, flops_per_token(n, mode, online_reference),
                      peak.flops * processes if peak.flops else None, source, formula)


def run_hardware(device: torch.device, dtype: torch.dtype, processes: int, machines: int) -> dict:
    """What the run ran on, for train_results.json and the card: the CPU's model, the GPU's name and
    how many this machine has, the run's processes and machines, device type, dtype, torch threads."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu_model(), "gpu": gpu, "gpus": torch.cuda.device_count() if gpu else 0,
            "processes": processes, "machines": machines, "device": device.type,
            "dtype": str(dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads()}
