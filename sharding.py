"""How the model is spread over processes: FSDP2, DeepSpeed ZeRO or a single process, with optional LoRA/QLoRA.

train.py calls check_combination(), load_lm(), prepare(), set_grad_sync(), backward() and optimizer_step();
checkpoint.py calls full_model_state() and is_deepspeed(). Each backend lives here, top to bottom.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from config import Config, ConfigError

STRATEGY_RESHARD = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "NO_SHARD": False, "HYBRID_SHARD": True}


def backend_for(cfg: Config, world_size: int) -> str:
    """A plain `python train.py` needs no backend; under torchrun even one process runs the chosen one, so one
    GPU runs the same FSDP2 / DeepSpeed code (and CPU offload) as eight. check_combination refuses `none` with
    several processes."""
    return cfg.distributed_backend if world_size > 1 or dist.is_initialized() else "none"


def init_process_group(device: torch.device, world_size: int, timeout_minutes: float):
    """The group of the processes torchrun started. CUDA runs get gloo beside NCCL: CPU tensors (offloaded
    gradients and their norm) reduce over gloo. The timeout covers rank 0 tokenizing while the others wait."""
    from datetime import timedelta
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    kwargs = {"timeout": timedelta(minutes=timeout_minutes)}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # after a torchrun restart the agent's store still holds the dead workers' addresses; key by attempt
        kwargs["store"] = dist.PrefixStore(f"minilab/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                                           dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                         world_size, is_master=False))
        kwargs.update(rank=int(os.environ["RANK"]), world_size=world_size)
    dist.init_process_group(backend, **kwargs)


def check_combination(cfg: Config, world_size: int, device: torch.device):
    """Refuse, before anything loads, every setting combination that cannot work; all problems in one message."""
    import importlib.util
    backend = backend_for(cfg, world_size)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    ds, lora = cfg.deepspeed_options, cfg.lora
    problems = []
    if world_size > 1 and cfg.distributed_backend == "none":
        problems.append("distributed_backend=none runs one process, but this run has "
                        f"{world_size}: use distributed_backend=fsdp or deepspeed, or start one process")
    if world_size > cfg.effective_batch_size:
        problems.append(f"effective_batch_size {cfg.effective_batch_size} is smaller than the {world_size} "
                        "processes: every step would leave a process without a sample; raise "
                        "effective_batch_size or start fewer processes")
    if lora.quantize_data_type and backend != "none":
        problems.append(f"QLoRA (lora.quantize_data_type={lora.quantize_data_type}) runs in one process without "
                        f"a distributed backend: {backend} cannot shard bitsandbytes 4-bit weights; start one "
                        "process (plain python, or distributed_backend=none under torchrun), or drop "
                        "lora.quantize_data_type to train plain LoRA on several")
    if cfg.dtype == "float16" and backend != "deepspeed":
        problems.append("dtype=float16 needs loss scaling against gradient underflow, which only "
                        "distributed_backend=deepspeed does here: use bfloat16 (GPUs since Ampere) or float32")
    if lora.quantize_data_type and not importlib.util.find_spec("bitsandbytes"):
        problems.append("QLoRA needs bitsandbytes: pip install bitsandbytes")
    if backend == "fsdp" and cfg.fsdp_options.cpu_offload_params and device.type == "cpu":
        problems.append("fsdp_options.cpu_offload_params moves parameters from the GPU to the CPU, but this run "
                        "is on the CPU already: set fsdp_options.cpu_offload_params=false")
    if backend == "fsdp" and cfg.fsdp_options.sharding_strategy == "HYBRID_SHARD" and world_size % local:
        problems.append(f"HYBRID_SHARD needs the same number of processes on every node, but the world size "
                        f"{world_size} is not a multiple of LOCAL_WORLD_SIZE {local}: start --nproc-per-node "
                        "processes on each node, or use FULL_SHARD")
    if backend == "deepspeed":
        if cfg.optimizer == "muon":
            problems.append("optimizer=muon needs each weight matrix whole, but DeepSpeed ZeRO hands the optimizer "
                            "flat partitions: use distributed_backend=fsdp (Muon gathers the shards it needs)")
        if not importlib.util.find_spec("deepspeed"):
            problems.append("distributed_backend=deepspeed needs DeepSpeed: pip install deepspeed "
                            "(or use distributed_backend=fsdp)")
        if ds.cpu_offload_optimizer and device.type == "cpu":
            problems.append("deepspeed_options.cpu_offload_optimizer moves optimizer state from the GPU to the "
                            "CPU, but this run is on the CPU already: set it to false")
        if not 0.0 < ds.cpu_offload_optimizer_ratio <= 1.0:
            problems.append(f"deepspeed_options.cpu_offload_optimizer_ratio must be in (0, 1], got "
                            f"{ds.cpu_offload_optimizer_ratio}")
        elif ds.cpu_offload_optimizer_ratio < 1.0 and ds.zero_stage != 3:
            problems.append("deepspeed_options.cpu_offload_optimizer_ratio < 1 (partial offload) needs ZeRO "
                            "stage 3: set deepspeed_options.zero_stage=3 or the ratio to 1.0")
    if problems:
        raise ConfigError("this combination of settings cannot work:\n  - " + "\n  - ".join(problems))


def load_lm(model_path: str, cfg: Config, rank: int, world_size: int, compute_dtype: torch.dtype, attn: str):
    """The HF model (peft-wrapped for LoRA), fp32 master weights. Under FSDP only rank 0 reads the weights; the
    others hold meta parameters that prepare() fills by broadcast, so host memory does not grow per process."""
    from model import check_packing_support, load_model
    if backend_for(cfg, world_size) == "fsdp" and rank != 0:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        with init_empty_weights(include_buffers=False):  # buffers such as rotary tables stay real
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=torch.float32,
                                                  attn_implementation=attn)
        lm.tie_weights()  # init_empty_weights unties the output head from the embedding
        check_packing_support(lm.config)
    elif cfg.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=torch.float32,
                                              attn_implementation=attn)
        check_packing_support(lm.config)
    else:
        quantization = None
        if cfg.lora.quantize_data_type == "nf4":
            from transformers import BitsAndBytesConfig
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
        lm = load_model(model_path, torch.float32, attn, quantization_config=quantization)
    return apply_lora(lm, cfg) if cfg.lora.rank > 0 else lm


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
    """Shard or place the model (a model.CausalLMWithLoss), then build the optimizer on what each rank holds.
    Returns (model, optimizer); under DeepSpeed the model is its engine and the optimizer the torch one inside,
    which the LR scheduler drives."""
    backend = backend_for(cfg, world_size)
    model.train()  # HF loads in eval mode: LoRA dropout would be off and bitsandbytes would repack 4-bit weights
    if cfg.activation_checkpointing != "none":
        enable_activation_checkpointing(model.lm, cfg.activation_checkpointing)
    if cfg.torch_compile:
        for layer in model.lm.get_decoder().layers:
            # forward only: FSDP's hooks stay outside the graph and parameter names stay unchanged
            layer.forward = torch.compile(layer.forward, dynamic=True)
    if backend == "fsdp":
        shard_fsdp2(model, cfg, device, world_size, compute_dtype)
    elif backend == "deepspeed":
        return init_deepspeed(model, cfg, device, compute_dtype, make_optimizer)
    else:
        model.to(device)
    return model, make_optimizer(model)


def costly_ops() -> list:
    """What selective activation checkpointing keeps: matmul and attention outputs. The cheap rest (norms,
    activations, rotary) is recomputed, and their saved inputs were most of the memory."""
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    ops = [getattr(torch.ops.aten, name).default for name in names]
    if hasattr(torch.ops.flash_attn, "_flash_attn_varlen_forward"):  # registered once flash_attn is imported
        ops.append(torch.ops.flash_attn._flash_attn_varlen_forward.default)
    return ops


def enable_activation_checkpointing(lm, mode: str):
    """Recompute each decoder layer in backward; `selective` keeps the outputs of costly_ops()."""
    from functools import partial

    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, costly_ops())
    if hasattr(lm, "activation_checkpointing_enable"):  # its name since transformers 5.x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def shard_fsdp2(model, cfg: Config, device: torch.device, world_size: int, compute_dtype: torch.dtype):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    strategy = cfg.fsdp_options.sharding_strategy
    if strategy == "NO_SHARD":  # replicate everywhere: a 2-D mesh whose shard dimension has size 1
        mesh = init_device_mesh(device.type, (world_size, 1), mesh_dim_names=("replicate", "shard"))
    elif strategy == "HYBRID_SHARD":  # shard inside a node, replicate across nodes
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        mesh = init_device_mesh(device.type, (world_size // local, local), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world_size,))
    offload = cfg.fsdp_options.cpu_offload_params
    kwargs = {"mesh": mesh, "reshard_after_forward": STRATEGY_RESHARD[strategy],
              "mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32),
              "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    full_state = model.state_dict() if dist.get_rank() == 0 else {}  # rank 0's weights, kept for the broadcast
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    layers = list(model.lm.get_decoder().layers)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    ahead = cfg.fsdp_options.prefetch_layers
    if ahead:  # issue the next layers' all-gathers early so they overlap this layer's compute
        for i, layer in enumerate(layers):
            layer.set_modules_to_forward_prefetch(layers[i + 1:i + 1 + ahead])
            layer.set_modules_to_backward_prefetch(layers[max(0, i - ahead):i][::-1])
    model.to_empty(device=device)  # this rank's shards, filled from rank 0 below
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if offload:  # NCCL broadcasts GPU tensors only; CPUOffloadPolicy then wants the shards on the CPU
        model.to("cpu")


def init_deepspeed(model, cfg: Config, device: torch.device, compute_dtype: torch.dtype, make_optimizer):
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # CPU runs use DeepSpeed's CPU accelerator and gloo
    import deepspeed
    ds = cfg.deepspeed_options
    zero = {"stage": ds.zero_stage}
    if ds.cpu_offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": ds.cpu_offload_optimizer_pin_memory,
                                     "ratio": ds.cpu_offload_optimizer_ratio}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,  # train.py sets boundaries
              "gradient_clipping": cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0,
              "zero_optimization": zero, "bf16": {"enabled": compute_dtype == torch.bfloat16},
              "fp16": {"enabled": compute_dtype == torch.float16},
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
              "steps_per_print": 2**31 - 1}
    model.to(device)
    optimizer = make_optimizer(model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if ds.zero_stage == 3:  # loss_fn reads the output head's weight outside lm_head's forward: gather it too
        deepspeed.zero.register_external_parameter(engine.module, model.lm.get_output_embeddings().weight)
    return engine, optimizer


def is_deepspeed(model) -> bool:
    return hasattr(model, "set_gradient_accumulation_boundary")


def set_grad_sync(model, sync: bool):
    """Skip the gradient reduction (and, under DeepSpeed, the step) on all but the last micro-step."""
    if is_deepspeed(model):
        model.set_gradient_accumulation_boundary(sync)
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def backward(model, loss: torch.Tensor):
    if is_deepspeed(model):
        model.backward(loss)
    else:
        loss.backward()


def optimizer_step(model, optimizer, max_grad_norm: float, exact_norm=False) -> float:
    """Clip, step, zero; returns the global gradient norm before clipping (exact_norm: to fp64's precision)."""
    if os.environ.get("MINILAB_DUMP_GRADS"):
        dump_grads(model, Path(os.environ["MINILAB_DUMP_GRADS"]))
    if is_deepspeed(model):  # the engine clips (gradient_clipping), steps and zeroes
        model.step()
        return float(model.get_global_grad_norm())
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.stack([squared_norm(p.grad, exact_norm) for p in params]).sum().sqrt()
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor, reduced over the ranks here
        norm = norm.full_tensor()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm.float())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def squared_norm(grad: torch.Tensor, exact: bool) -> torch.Tensor:
    """|grad|^2. torch's fp32 norm on the CPU sums naively (9e-5 low on a 3.1M-element output head, less once FSDP
    splits it), so backends disagreed. Rows are short enough for fp32, their squares summed in fp64: under 1e-8
    relative (rounding the result to fp32 costs 6e-8), at a fifth of the time of an fp64 copy of every gradient
    (0.18 s of a 3.3 s step). `exact` takes that copy (~1e-13). CUDA's tree sums are fine as they are."""
    if grad.device.type != "cpu":
        return torch.linalg.vector_norm(grad).square()
    if exact or grad.dim() < 2:
        return torch.linalg.vector_norm(grad, dtype=torch.float64).square()
    return torch.linalg.vector_norm(grad, dim=-1).double().square().sum()


def dump_grads(model, folder: Path):
    """Test hook (README, "Test hooks"): MINILAB_DUMP_GRADS=DIR makes rank 0 write each optimizer step's whole,
    reduced gradient of every trained parameter, before clipping, to DIR/grads_step_N.safetensors, so tests
    compare gradients across backends, not only the weights Adam made of them. Collective."""
    from safetensors.torch import save_file
    deepspeed = is_deepspeed(model)
    if deepspeed:
        from deepspeed.utils import safe_get_full_grad
    grads = {}
    for name, p in (model.module if deepspeed else model).named_parameters():
        grad = (safe_get_full_grad(p) if deepspeed else p.grad) if p.requires_grad else None
        if grad is not None:
            grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad  # FSDP2: a sharded DTensor
            grads[name] = grad.detach().float().cpu().contiguous()
    if not dist.is_initialized() or dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        step = len(list(folder.glob("grads_step_*.safetensors"))) + 1  # counts on after a resume
        save_file(grads, folder / f"grads_step_{step}.safetensors")


def whole_numel(p) -> int:
    """A parameter's element count over all ranks: a DTensor's numel is already global, a ZeRO-3 partition keeps
    it in ds_numel, and bitsandbytes packs two 4-bit weights into a byte."""
    if getattr(p, "quant_state", None) is not None:
        return math.prod(p.quant_state.shape)
    return getattr(p, "ds_numel", p.numel())


def full_model_state(model) -> dict | None:
    """The whole model's state dict on CPU on rank 0 (None elsewhere), keys as in model.CausalLMWithLoss.
    Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    rank = dist.get_rank() if dist.is_initialized() else 0
    if is_deepspeed(model):
        if model.zero_optimization_partition_weights():  # ZeRO-3
            return model._zero3_consolidated_16bit_state_dict()
        return {k: v.detach().cpu() for k, v in model.module.state_dict().items()} if rank == 0 else None
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if rank == 0 else None


def dequantized_state(lm) -> dict:
    """A QLoRA model's state with every bitsandbytes 4-bit weight dequantized, so the merge is made against the
    base the adapter was trained with, and saved as a normal floating-point model."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    state = {}
    for name, module in lm.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if isinstance(module, bnb.nn.Linear4bit) and pname == "weight":
                p = bnbf.dequantize_4bit(p.data, p.quant_state).float()
            state[f"{name}.{pname}" if name else pname] = p.detach().cpu()
    return state


def check_merge(adapter_lm, merged, vocab_size: int, rtol: float = 1e-4):
    """The merged model must give the adapter model's logits; a bad merge fails here, not in deployment.

    Both run in fp32, whatever dtype training computes in: the 4-bit layers dequantize to fp32 for it (the very
    weights the merge used) and the rest are fp32 master weights. So the two differ only by fp32 rounding of one
    function, ~1e-6 of the largest logit on small models; rtol leaves room for deep ones and still catches a
    wrong scale or base. In bf16 each rounding alone is 2^-8, as large as many a merge error."""
    for name, buf in adapter_lm.get_base_model().named_buffers():  # rotary tables are not in a state dict
        module, _, leaf = name.rpartition(".")
        if getattr(merged.get_submodule(module), leaf).is_meta:
            merged.get_submodule(module).register_buffer(leaf, buf.detach().cpu(), persistent=False)
    ids = torch.arange(min(32, vocab_size))[None]
    device = next(adapter_lm.parameters()).device
    quantized = [m for m in adapter_lm.modules()
                 if type(m).__name__ == "Linear4bit" and m.__module__.startswith("bitsandbytes")]
    was_training, compute_dtypes = adapter_lm.training, [m.compute_dtype for m in quantized]
    adapter_lm.eval()  # no dropout in the comparison
    for module in quantized:  # in eval mode bitsandbytes repacks 4-bit weights for a bf16 CPU kernel
        module.train()
        module.compute_dtype = torch.float32
    try:
        with torch.no_grad():
            want = adapter_lm(input_ids=ids.to(device)).logits.float().cpu()
            got = merged.float()(input_ids=ids).logits
    finally:
        adapter_lm.train(was_training)
        for module, dtype in zip(quantized, compute_dtypes):
            module.compute_dtype = dtype
    err = (want - got).abs().max().item()
    if err > rtol * want.abs().max().item():
        raise RuntimeError(f"merged LoRA model differs from the adapter model: max logit difference {err:.3g}")
    print(f"merged model matches the adapter model: max logit difference {err:.2g}", flush=True)
    return err


def barrier():
    if dist.is_initialized():
        dist.barrier()
