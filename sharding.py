"""How the model is spread over processes: FSDP2, DeepSpeed ZeRO or a single process, with optional LoRA/QLoRA.

train.py only calls prepare(), backward(), optimizer_step() and set_grad_sync(); each backend lives here.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from config import Config, ConfigError

STRATEGY_RESHARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "NO_SHARD": False, "HYBRID_SHARD": True}


def backend_for(cfg: Config, world_size: int) -> str:
    if world_size > 1 and cfg.distributed_backend == "none":
        raise ConfigError("distributed_backend 'none' runs one process; with more processes use fsdp or deepspeed")
    return cfg.distributed_backend if world_size > 1 else "none"


def apply_lora(lm, cfg: Config):
    """Wrap the model with peft LoRA adapters; only they train."""
    from peft import LoraConfig, get_peft_model
    target = cfg.lora.target_modules or "all-linear"  # peft: every linear layer except the output head
    lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=target, task_type="CAUSAL_LM")
    try:
        return get_peft_model(lm, lora)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules: {e}") from None


def prepare(model, cfg: Config, device: torch.device, world_size: int, compute_dtype: torch.dtype, make_optimizer):
    """Shard or place the model (a model.CausalLMWithLoss), then build the optimizer on what each rank holds."""
    backend = backend_for(cfg, world_size)
    if cfg.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if backend == "fsdp":
        shard_fsdp2(model, cfg, device, world_size, compute_dtype)
    else:
        model.to(device)
    return model, make_optimizer(model)


def shard_fsdp2(model, cfg: Config, device: torch.device, world_size: int, compute_dtype: torch.dtype):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    strategy = cfg.fsdp_options.sharding_strategy
    if strategy == "NO_SHARD":  # replicate everywhere: a 2-D mesh whose shard dimension has size 1
        mesh = init_device_mesh(device.type, (world_size, 1), mesh_dim_names=("replicate", "shard"))
    elif strategy == "HYBRID_SHARD":  # shard inside a node, replicate across nodes
        local = int(__import__("os").environ.get("LOCAL_WORLD_SIZE", world_size))
        mesh = init_device_mesh(device.type, (world_size // local, local), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world_size,))
    kwargs = {"mesh": mesh, "reshard_after_forward": STRATEGY_RESHARD[strategy],
              "mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32),
              "offload_policy": CPUOffloadPolicy() if cfg.fsdp_options.cpu_offload_params else OffloadPolicy()}
    if not cfg.fsdp_options.cpu_offload_params:
        model.to(device)
    for layer in model.lm.get_decoder().layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def set_grad_sync(model, sync: bool):
    """Skip the gradient reduction on all but the last micro-step of an optimizer step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def backward(model, loss: torch.Tensor):
    loss.backward()


def optimizer_step(model, optimizer, max_grad_norm: float) -> float:
    """Clip, step, zero; returns the global gradient norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def barrier():
    if dist.is_initialized():
        dist.barrier()
