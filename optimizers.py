"""`optimizer: muon`: Muon for the hidden matrices, AdamW for the rest, as one torch Optimizer.

One object, so the LR scheduler, gradient clipping and checkpoint.py's full-state save/load (torch distributed
checkpoint, keyed by parameter name) see one list of param groups and one state, as with AdamW alone.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr
from torch.optim._muon import _zeropower_via_newtonschulz


def hidden_matrices(model) -> list:
    """The 2-D weights inside the decoder layers. Embeddings, the output head, norms, biases and 3-D expert
    weights stay with AdamW (Muon orthogonalizes matrix updates; a lookup table or a head is no such map)."""
    return [p for p in model.lm.get_decoder().layers.parameters() if p.requires_grad and p.ndim == 2]


class MuonAdamW(torch.optim.Optimizer):
    """Group 0 is Muon (torch.optim.Muon's update and defaults; `match_rms_adamw` scales it to AdamW's RMS, so
    both take learning_rate and weight_decay); the others step with a fused torch AdamW that shares this
    optimizer's groups and state."""

    def __init__(self, muon_params: list, adamw_groups: list, lr: float, betas: tuple, weight_decay: float):
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, fused=True)
        muon = {"params": muon_params, "lr": lr, "weight_decay": weight_decay, "momentum": 0.95, "nesterov": True,
                "ns_coefficients": (DEFAULT_A, DEFAULT_B, DEFAULT_C), "eps": EPS, "ns_steps": DEFAULT_NS_STEPS,
                "adjust_lr_fn": "match_rms_adamw"}
        super().__init__([muon] + self.adamw.param_groups, {})
        self._share()

    def _share(self):
        self.adamw.param_groups, self.adamw.state = self.param_groups[1:], self.state

    def __setstate__(self, state):  # load_state_dict replaces groups and state: share the new ones
        super().__setstate__(state)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.adamw.step(closure)  # evaluates the closure, if any, before either update
        group = self.param_groups[0]
        for p in group["params"]:
            if p.grad is not None:
                muon_step(p, self.state[p], group)
        return loss


def muon_step(p, state: dict, group: dict):
    """torch.optim.Muon's update of one matrix (_single_tensor_muon). Newton-Schulz needs the whole matrix, and
    torch's runs on FSDP2 shards (DTensors) but gives another result (measured: 0.02 off on a 10x6 matrix). So a
    shard gathers its momentum-blended gradient, every rank orthogonalizes the same whole matrix and keeps its
    own rows; the momentum stays sharded."""
    momentum, lr = group["momentum"], group["lr"]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(p.grad)
    buf = state["momentum_buffer"]
    buf.lerp_(p.grad, 1 - momentum)
    update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
    whole = update.full_tensor() if isinstance(update, DTensor) else update
    ortho = _zeropower_via_newtonschulz(whole, group["ns_coefficients"], group["ns_steps"], group["eps"])
    if isinstance(update, DTensor):  # Replicate -> the shard's placements: a local slice, no communication
        mesh = update.device_mesh
        ortho = DTensor.from_local(ortho, mesh, [Replicate()] * mesh.ndim).redistribute(mesh, update.placements)
    p.mul_(1 - lr * group["weight_decay"])
    p.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
