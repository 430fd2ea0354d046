"""What every optimizer of :mod:`optim` shares: option checks, tensor-only state, matrix views.

Each optimizer keeps its per-parameter state as tensors only (moments, bases, integer indices,
seeds), so ``torch.load(path, weights_only=True)`` reads a saved ``state_dict``. Floating state of
fp16/bf16 parameters lives in fp32 (:func:`state_dtype`); :meth:`TensorStateOptimizer.load_state_dict`
keeps that choice and keeps integer tensors integer, where ``torch.optim.Optimizer`` would cast every
tensor to the parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from decomp._checks import check_real, compute_dtype

from ._adam import adamw_step

__all__ = [
    "TensorStateOptimizer",
    "as_matrix",
    "check_adam_options",
    "check_grad",
    "check_param",
    "local",
    "state_dtype",
]


def state_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype of floating optimizer state for ``param``: fp32 for fp16/bf16, else its own."""
    return compute_dtype(param.dtype)


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-D view an optimizer works on: ``(shape[0], -1)`` for N-D tensors (conv kernels)."""
    return tensor if tensor.ndim == 2 else tensor.reshape(tensor.shape[0], -1)


def check_param(param: torch.Tensor) -> None:
    """Reject parameters no optimizer here supports (complex or non-floating), with a TypeError."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"params must be tensors, got {type(param).__name__}")
    if param.is_complex() or not param.is_floating_point():
        raise TypeError(
            f"parameters must have a real floating dtype (float16, bfloat16, float32, float64), "
            f"got {param.dtype}"
        )


def check_adam_options(group: dict[str, Any]) -> None:
    """Validate the options every group shares (the AdamW fallback reads them all)."""
    check_real(group["lr"], "lr", low=0.0, low_inclusive=True)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair of floats, got {betas!r}")
    for index, beta in enumerate(betas):
        check_real(beta, f"betas[{index}]", low=0.0, high=1.0, low_inclusive=True)
    check_real(group["eps"], "eps", low=0.0, low_inclusive=True)
    check_real(group["weight_decay"], "weight_decay", low=0.0, low_inclusive=True)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a plain tensor is its own)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def check_grad(param: torch.Tensor) -> torch.Tensor:
    """The gradient of ``param``; sparse gradients raise (no projection of a sparse layout)."""
    grad = param.grad
    if grad.is_sparse:
        raise RuntimeError("sparse gradients are not supported; use torch.optim.SparseAdam")
    return grad


class TensorStateOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` whose state is tensors only, with a dtype-preserving load.

    Subclasses validate their own options (:meth:`_check_group`, run with the parameter checks on
    every group, the constructor's included, since ``torch.optim.Optimizer.__init__`` adds its
    groups through :meth:`add_param_group`); this class rejects complex and integer parameters
    and restores state so that a save -> load in the middle of a run continues bit-identically.
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        count = len(self.param_groups)
        try:
            super().add_param_group(param_group)
            for param in self.param_groups[-1]["params"]:
                check_param(param)
            self._check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            del self.param_groups[count:]  # a rejected group leaves the optimizer as it was
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one group's options (subclasses raise ``ValueError``/``TypeError``)."""

    def _takes_adamw(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``param`` takes the plain AdamW step (default: tensors with fewer than 2 dims)."""
        return param.ndim < 2

    def _check_gradients(self) -> None:
        """Raise before any parameter or state changes (default: nothing to check)."""

    def _step_matrices(
        self, group: dict[str, Any], params: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Step the ``(param, grad)`` pairs of ``group`` that do not take AdamW."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter with a gradient; returns ``closure()`` if given.

        Parameters that :meth:`_takes_adamw` step with ``torch.optim.AdamW``'s arithmetic and the
        group's ``lr``, ``betas``, ``eps`` and ``weight_decay``; the others of each group go to
        :meth:`_step_matrices` together.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        for group in self.param_groups:
            matrices = []
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = check_grad(param)
                if self._takes_adamw(param, group):
                    adamw_step(
                        local(param),
                        local(grad),
                        self.state[param],
                        lr=group["lr"],
                        betas=group["betas"],
                        eps=group["eps"],
                        weight_decay=group["weight_decay"],
                    )
                else:
                    matrices.append((param, grad))
            if matrices:
                self._step_matrices(group, matrices)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch.optim.Optimizer.load_state_dict calls its own static cast policy by class name,
        # not through self, so the saved tensors are re-cast here with ours.
        saved = {key: dict(values) for key, values in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = {
            key: param
            for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
            for key, param in zip(saved_group["params"], group["params"])
        }
        for key, values in saved.items():
            param = params[key]
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    self.state[param][name] = self._process_value_according_to_param_policy(
                        param, value, key, self.param_groups, name
                    )

    @staticmethod
    def _process_value_according_to_param_policy(
        param: torch.Tensor,
        value: torch.Tensor,
        param_id: int,
        param_groups: list[dict[Any, Any]],
        key: Hashable = None,
    ) -> torch.Tensor:
        # torch casts every state tensor to the parameter's dtype; that would turn integer
        # subspace indices and seeds into floats and fp32 moments of bf16 weights into bf16.
        # Counters and seeds (0-d integers) stay host tensors, as torch.optim keeps its step, so
        # schedules read them without a device sync.
        if key == "step" or (value.ndim == 0 and not value.is_floating_point()):
            return value
        if value.is_floating_point():
            return value.to(dtype=state_dtype(param), device=param.device)
        return value.to(device=param.device)
