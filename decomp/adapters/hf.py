r"""Adapter-only checkpoints from a transformers ``Trainer``.

:class:`AdapterCheckpointCallback` writes :func:`~decomp.adapters.save_adapter`'s file into every
checkpoint folder ``Trainer`` saves (``<output_dir>/checkpoint-<step>/adapter.safetensors``):
the adapters' tensors, the heads trained with ``train_heads`` and the normalisation statistics
(``extra=True``), a few kilobytes where ``Trainer``'s own ``model.safetensors`` holds the whole
network. ``Trainer``'s checkpoint is what ``trainer.train(resume_from_checkpoint=...)`` resumes
from; the adapter file is what you ship and load into a fresh copy of the pretrained model::

    model = AutoModelForCausalLM.from_pretrained(name)    # the pretrained network, untouched
    load_adapter(model, os.path.join(get_last_checkpoint(output_dir), "adapter.safetensors"))

:func:`~decomp.adapters.load_adapter` registers the adapters the file describes (class and
config from its metadata) and copies every tensor; the model then gives the tuned outputs.

This module imports ``transformers`` (an optional dependency); :mod:`decomp.adapters` does not
import this module.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .base import _dtensor_class
from .model import adapted_layers, save_adapter

__all__ = ["AdapterCheckpointCallback"]


class AdapterCheckpointCallback(TrainerCallback):
    r"""At every ``Trainer`` save, write the adapter file next to ``Trainer``'s checkpoint.

    After ``Trainer`` has written ``<args.output_dir>/checkpoint-<global_step>/``, the callback
    calls ``save_adapter(model, <that folder>/<filename>, extra=extra)``: for a model tuned with
    :func:`~decomp.adapters.apply`, a file of :math:`O(\text{trainable})` bytes with which
    :func:`~decomp.adapters.load_adapter` turns a fresh pretrained model into the tuned one.

    With several processes, those ``Trainer`` saves from (``args.should_save``) write the file;
    under FSDP2 (parameters sharded as DTensors) every process calls ``save_adapter``, which
    gathers the adapter tensors (a collective) and writes from rank 0.

    Args:
        filename: the file's name inside the checkpoint folder.
        extra: :func:`~decomp.adapters.save_adapter`'s ``extra``: ``True`` (default) adds the
            trainable non-adapter parameters (heads) and normalisation statistics, ``False``
            the adapters only, a list of module names exactly those modules' tensors.

    Raises:
        TypeError: ``filename`` is not a string; ``extra`` is not a bool or a list of strings.
        ValueError: ``filename`` is empty or holds a path separator; when training begins, the
            model has no adapters; at a save, a name in ``extra`` matches no module (from
            :func:`~decomp.adapters.save_adapter`).
        FileNotFoundError: at a save, the checkpoint folder is not where ``Trainer`` writes it
            without hyperparameter search (``Trainer.hyperparameter_search`` writes into
            ``run-<id>`` subfolders, which a callback cannot see).

    Example:
        >>> from decomp.adapters.hf import AdapterCheckpointCallback
        >>> AdapterCheckpointCallback()
        AdapterCheckpointCallback(filename='adapter.safetensors', extra=True)
        >>> # Trainer(model, args, train_dataset=..., callbacks=[AdapterCheckpointCallback()])
    """

    def __init__(
        self, filename: str = "adapter.safetensors", *, extra: bool | list[str] = True
    ) -> None:
        if not isinstance(filename, str):
            raise TypeError(f"filename must be a string, got {type(filename).__name__}")
        if not filename or any(sep and sep in filename for sep in (os.sep, os.altsep)):
            raise ValueError(
                "filename must be a file name inside the checkpoint folder (non-empty, no path "
                f"separator), got {filename!r}"
            )
        if not isinstance(extra, bool) and not (
            isinstance(extra, (list, tuple)) and all(isinstance(name, str) for name in extra)
        ):
            raise TypeError(f"extra must be True, False or a list of module names, got {extra!r}")
        self.filename = filename
        self.extra = extra

    def __repr__(self) -> str:
        return f"{type(self).__name__}(filename={self.filename!r}, extra={self.extra!r})"

    def checkpoint_path(self, args: TrainingArguments, state: TrainerState) -> str:
        """Where the file of the checkpoint at ``state.global_step`` goes."""
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return os.path.join(folder, self.filename)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        # The first save can be hours away: a model without adapters is refused now.
        if model is not None and not adapted_layers(model):
            raise ValueError(
                "AdapterCheckpointCallback: the model Trainer trains has no adapters to save; "
                "call decomp.adapters.apply on it before building the Trainer"
            )

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("AdapterCheckpointCallback.on_save: Trainer passed no model")
        path = self.checkpoint_path(args, state)
        sharded = _is_sharded(model)
        if not (sharded or args.should_save):
            return
        folder = os.path.dirname(path)
        if args.should_save and not os.path.isdir(folder):
            raise FileNotFoundError(
                f"AdapterCheckpointCallback: Trainer's checkpoint folder {folder} does not exist "
                "(hyperparameter search writes into run-<id> subfolders, which a callback cannot "
                "see); call decomp.adapters.save_adapter yourself there"
            )
        save_adapter(model, path, extra=self.extra)


def _is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2 shards (DTensors): then ``save_adapter`` is a collective."""
    dtensor = _dtensor_class()
    return dtensor is not None and any(isinstance(param, dtensor) for param in model.parameters())
