"""transformers ``Trainer`` and accelerate: adapter checkpoints, projected optimizers, consolidate.

(a) ``AdapterCheckpointCallback`` under a real ``Trainer`` (a tiny random-init Llama, CPU): every
    checkpoint folder gets an adapter file whose tensors are exactly those of ``Trainer``'s own
    checkpoint at that step, heads included; the file turns a fresh pretrained model into the
    tuned one (examples/trainer_adapter.py, which also asserts a bit-identical resume). A model
    without adapters is refused before the first step; a sharded (FSDP2) model is saved from
    every rank, as the gather needs.
(b) ``DCTProjectedAdam`` from ``param_groups`` as ``Trainer(optimizers=(opt, None))`` resumes
    bit-identically (examples/trainer_dct.py), and the comparison notices a resume without the
    optimizer state; so do all four optimizers under ``Trainer`` and under accelerate's
    ``save_state``/``load_state``; transformers' own ``galore_adamw`` does not resume (the
    contrast the docs state).
(c) ``optim.wrappers.consolidate`` through accelerate's ``AcceleratedOptimizer`` equals the direct call,
    and works on the optimizer ``Trainer`` hands its callbacks.
(d) examples/accelerate_fsdp.py: an adapter sharded by FSDP2 on two gloo ranks trains like one
    process and saves a file that loads into the unsharded model.
(e) Importing the library imports neither transformers nor accelerate.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from decomp.adapters import adapter_state_dict
from decomp.adapters.hf import AdapterCheckpointCallback
from optim import ARO, DCTProjectedAdam, RotatedAdam, SVDProjectedAdam, param_groups
from optim import consolidate, unwrap_optimizer

ROOT = Path(__file__).resolve().parents[1]


def example(name: str) -> ModuleType:
    """examples/<name>.py as a module (examples/ is not a package)."""
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trainer_adapter() -> ModuleType:
    return example("trainer_adapter")


@pytest.fixture(scope="module")
def trainer_dct() -> ModuleType:
    return example("trainer_dct")


# (a) --------------------------------------------------------------------------------------------


def test_every_checkpoint_holds_the_adapter_and_head_trainer_saved(trainer_adapter, tmp_path):
    model = trainer_adapter.adapted()
    trainer_adapter.make_trainer(model, tmp_path, steps=4, save_every=2).train()
    adapter_keys = set(adapter_state_dict(model))
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        saved = load_file(folder / "adapter.safetensors")
        whole = load_file(folder / "model.safetensors")  # Trainer's own checkpoint of that step
        assert adapter_keys <= saved.keys()
        assert {"score.weight"} == saved.keys() - adapter_keys  # the head trained with train_heads
        for key, value in saved.items():
            assert torch.equal(value, whole[key]), (step, key)
    # The two saves hold different values: the file is written at each save, not once.
    first, last = (
        load_file(tmp_path / f"checkpoint-{step}" / "adapter.safetensors") for step in (2, 4)
    )
    assert not torch.equal(first["score.weight"], last["score.weight"])


def test_extra_false_stores_the_adapters_only(trainer_adapter, tmp_path):
    model = trainer_adapter.adapted()
    trainer = trainer_adapter.make_trainer(model, tmp_path, steps=1, save_every=1)
    trainer.remove_callback(AdapterCheckpointCallback)
    trainer.add_callback(AdapterCheckpointCallback("only.safetensors", extra=False))
    trainer.train()
    saved = load_file(tmp_path / "checkpoint-1" / "only.safetensors")
    assert saved.keys() == adapter_state_dict(model).keys()


def test_trainer_adapter_example_resumes_and_reloads(trainer_adapter, capsys):
    # main() asserts the bit-identical resume and the exact reload itself.
    result = trainer_adapter.main(["--steps", "6", "--save-every", "3"])
    assert result["losses"].keys() == set(range(1, 7))
    assert result["adapter_bytes"] * 10 < result["checkpoint_bytes"]
    assert "resumed from checkpoint-3" in capsys.readouterr().out


def test_callback_writes_only_where_trainer_saves(trainer_adapter, tmp_path):
    model = trainer_adapter.adapted()
    (tmp_path / "checkpoint-5").mkdir()
    state = SimpleNamespace(global_step=5)
    callback = AdapterCheckpointCallback()
    elsewhere = SimpleNamespace(output_dir=str(tmp_path), should_save=False)
    callback.on_save(elsewhere, state, None, model=model)
    assert not (tmp_path / "checkpoint-5" / "adapter.safetensors").exists()
    saving = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    callback.on_save(saving, state, None, model=model)
    assert (tmp_path / "checkpoint-5" / "adapter.safetensors").exists()


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is unavailable",
)
def test_callback_saves_a_sharded_model_from_every_rank(trainer_adapter, tmp_path):
    # Under FSDP2 save_adapter gathers (a collective): a rank Trainer does not save from must
    # take part too, and rank 0 writes. One rank suffices to see the callback make the call.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        model = fully_shard(trainer_adapter.adapted(), mesh=init_device_mesh("cpu", (1,)))
        (tmp_path / "checkpoint-1").mkdir()
        not_saving = SimpleNamespace(output_dir=str(tmp_path), should_save=False)
        step = SimpleNamespace(global_step=1)
        AdapterCheckpointCallback().on_save(not_saving, step, None, model=model)
        saved = load_file(tmp_path / "checkpoint-1" / "adapter.safetensors")
    finally:
        dist.destroy_process_group()
    assert saved.keys() >= adapter_state_dict(trainer_adapter.adapted()).keys()


def test_callback_refuses_a_missing_checkpoint_folder(trainer_adapter, tmp_path):
    args = SimpleNamespace(output_dir=str(tmp_path / "run-0"), should_save=True)
    with pytest.raises(FileNotFoundError, match="hyperparameter search"):
        AdapterCheckpointCallback().on_save(
            args, SimpleNamespace(global_step=1), None, model=trainer_adapter.adapted()
        )


def test_callback_refuses_a_model_without_adapters_before_training(trainer_adapter, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to=[], disable_tqdm=True
    )
    trainer = Trainer(
        model=trainer_adapter.pretrained(),
        args=args,
        train_dataset=trainer_adapter.FirstTokenTask(),
        callbacks=[AdapterCheckpointCallback()],
    )
    with pytest.raises(ValueError, match="no adapters to save"):
        trainer.train()
    assert trainer.state.global_step == 0  # refused before the first step


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (("",), ValueError, "file name"),
        (("checkpoints/adapter.safetensors",), ValueError, "path separator"),
        ((3,), TypeError, "filename must be a string"),
        (("adapter.safetensors", "score"), TypeError, "extra must be"),
    ],
)
def test_callback_refuses_bad_arguments(arguments, error, message):
    filename, *extra = arguments
    with pytest.raises(error, match=message):
        AdapterCheckpointCallback(filename, **({"extra": extra[0]} if extra else {}))


# (b) --------------------------------------------------------------------------------------------


def test_trainer_dct_example_resumes_bit_identically(trainer_dct, capsys):
    # main() asserts equal losses and parameters after the resume (between two refreshes).
    result = trainer_dct.main(["--steps", "5", "--save-every", "2", "--update-gap", "3"])
    assert 0 < result["projected"] < result["total"]
    assert "losses and parameters equal" in capsys.readouterr().out


def test_a_resume_without_the_optimizer_state_is_noticed(trainer_dct, tmp_path):
    # The comparison the example makes is sensitive: drop optimizer.pt and the runs part.
    uninterrupted, model = trainer_dct.make_trainer(tmp_path, 5, 2, rank=4, update_gap=3)
    uninterrupted.train()
    (tmp_path / "checkpoint-2" / "optimizer.pt").unlink()
    resumed, resumed_model = trainer_dct.make_trainer(
        tmp_path / "resumed", 5, 2, rank=4, update_gap=3
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert not all(
        torch.equal(value, other)
        for value, other in zip(model.state_dict().values(), resumed_model.state_dict().values())
    )


def test_transformers_galore_does_not_resume(trainer_dct, tmp_path):
    # The contrast docs/hf.md states: GaLore's projector objects are not weights_only-loadable.
    pytest.importorskip("galore_torch")
    def galore_trainer(folder: Path) -> Trainer:
        args = TrainingArguments(
            output_dir=str(folder), max_steps=3, save_steps=2, per_device_train_batch_size=8,
            use_cpu=True, report_to=[], disable_tqdm=True, optim="galore_adamw",
            optim_target_modules=["q_proj", "v_proj"], optim_args="rank=4, update_proj_gap=2",
        )
        model = trainer_dct.pretrained()
        return Trainer(model=model, args=args, train_dataset=trainer_dct.CountingTask())

    galore_trainer(tmp_path).train()
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        checkpoint = str(tmp_path / "checkpoint-2")
        galore_trainer(tmp_path / "resumed").train(resume_from_checkpoint=checkpoint)


RESUMABLE = {
    "DCTProjectedAdam": lambda model: DCTProjectedAdam(
        param_groups(model, "all-linear", rank=4, update_gap=2), lr=1e-2
    ),
    "SVDProjectedAdam": lambda model: SVDProjectedAdam(
        param_groups(model, "all-linear", rank=4, update_gap=2), lr=1e-2
    ),
    "ARO": lambda model: ARO(model.parameters(), lr=1e-2),
    "RotatedAdam": lambda model: RotatedAdam(
        model.parameters(), lr=1e-2, basis="eigen", update_gap=2
    ),
}


def equal_state(model: torch.nn.Module, other: torch.nn.Module) -> bool:
    theirs = other.state_dict()
    return all(torch.equal(value, theirs[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("name", RESUMABLE)
def test_trainer_resumes_every_optimizer_bit_identically(trainer_dct, tmp_path, name):
    # Resumed at step 3, between the refreshes at 2 and 4 (update_gap=2).
    def run(folder: Path, resume_from: str | None = None) -> tuple[Trainer, torch.nn.Module]:
        model = trainer_dct.pretrained()
        args = TrainingArguments(
            output_dir=str(folder), max_steps=5, save_steps=3, per_device_train_batch_size=8,
            logging_steps=1, seed=0, use_cpu=True, report_to=[], disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=trainer_dct.CountingTask(),
            optimizers=(RESUMABLE[name](model), None),
        )
        trainer.train(resume_from_checkpoint=resume_from)
        return trainer, model

    uninterrupted, model = run(tmp_path)
    resumed, resumed_model = run(tmp_path / "resumed", str(tmp_path / "checkpoint-3"))
    losses, continued = trainer_dct.step_losses(uninterrupted), trainer_dct.step_losses(resumed)
    assert [continued[step] for step in (4, 5)] == [losses[step] for step in (4, 5)]
    assert equal_state(model, resumed_model)
    assert not equal_state(model, trainer_dct.pretrained())  # training moved the weights


@pytest.mark.parametrize("name", RESUMABLE)
def test_accelerate_save_state_resumes_every_optimizer_bit_identically(trainer_dct, tmp_path, name):
    from accelerate import Accelerator

    batches = trainer_dct.CountingTask().tokens.split(8)

    def prepared() -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer]:
        accelerator = Accelerator(cpu=True)
        model = trainer_dct.pretrained()
        model, optimizer = accelerator.prepare(model, RESUMABLE[name](model))
        return accelerator, model, optimizer

    def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            optimizer.zero_grad()
            batch = batches[step % len(batches)]
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()

    accelerator, model, optimizer = prepared()
    train(model, optimizer, range(3))
    accelerator.save_state(str(tmp_path / "state"))
    train(model, optimizer, range(3, 5))

    accelerator, resumed_model, resumed_optimizer = prepared()
    accelerator.load_state(str(tmp_path / "state"))
    train(resumed_model, resumed_optimizer, range(3, 5))
    assert equal_state(model, resumed_model)


# (c) --------------------------------------------------------------------------------------------


def protected_pair() -> tuple[torch.nn.Linear, DCTProjectedAdam]:
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 10)
    return model, DCTProjectedAdam(model.parameters(), lr=1e-2, rank=3, update_gap=2, protect=True)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(6, 12, generator=generator)).square().mean().backward()
        optimizer.step()


def test_accelerated_optimizer_hides_consolidate():
    # If accelerate starts forwarding the method, optim.wrappers.consolidate is no longer needed.
    from accelerate import Accelerator

    _, optimizer = protected_pair()
    prepared = Accelerator(cpu=True).prepare(optimizer)
    with pytest.raises(AttributeError):
        prepared.consolidate()


def test_consolidate_through_accelerate_equals_the_direct_call():
    from accelerate import Accelerator

    direct_model, direct = protected_pair()
    model, optimizer = protected_pair()
    accelerator = Accelerator(cpu=True)
    model, prepared = accelerator.prepare(model, optimizer)
    assert type(prepared) is not type(optimizer) and unwrap_optimizer(prepared) is optimizer
    train_steps(direct_model, direct, 3)
    train_steps(model, prepared, 3)
    counts = consolidate(prepared)
    assert counts == direct.consolidate() and sum(counts.values()) > 0
    weight, direct_weight = model.weight, direct_model.weight
    protected = optimizer.state[weight]["protected"]
    assert torch.equal(protected, direct.state[direct_weight]["protected"])
    train_steps(direct_model, direct, 2)  # the next task steps alike, off the protected subspace
    train_steps(model, prepared, 2)
    assert torch.equal(weight, direct_weight)


def test_consolidate_from_a_trainer_callback(trainer_dct, tmp_path):
    # Trainer hands callbacks its accelerate-wrapped optimizer: consolidate reaches through it.
    class EndOfTask(TrainerCallback):
        def __init__(self) -> None:
            self.counts: dict[str, int] = {}

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 2:
                self.counts = consolidate(optimizer)

    model = trainer_dct.pretrained()
    groups = param_groups(model, ["q_proj", "v_proj"], rank=4, update_gap=2, protect=True)
    optimizer = DCTProjectedAdam(groups, lr=1e-2)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, use_cpu=True,
        report_to=[], disable_tqdm=True, save_strategy="no",
    )
    end_of_task = EndOfTask()
    trainer = Trainer(
        model=model, args=args, train_dataset=trainer_dct.CountingTask(),
        optimizers=(optimizer, None), callbacks=[end_of_task],
    )
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer) is optimizer and trainer.optimizer is not optimizer
    assert sum(end_of_task.counts.values()) > 0
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert optimizer.state[q_proj]["protected"].shape[1] > 0


def test_consolidate_refuses_optimizers_without_it():
    from accelerate import Accelerator

    adamw = torch.optim.AdamW(torch.nn.Linear(4, 4).parameters())
    with pytest.raises(TypeError, match="AdamW .inside AcceleratedOptimizer. has no consolidate"):
        consolidate(Accelerator(cpu=True).prepare(adamw))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        consolidate(object())


def test_unwrap_refuses_a_loop():
    _, optimizer = protected_pair()
    optimizer.optimizer = optimizer
    with pytest.raises(TypeError, match="leads back"):
        unwrap_optimizer(optimizer)


# (d) --------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is unavailable",
)
@pytest.mark.slow
def test_accelerate_fsdp_example_trains_like_one_process(monkeypatch, capsys):
    # The example asserts the gathered adapters and the reloaded file against one process. The
    # spawned processes find its worker by module name on the sys.path they inherit.
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    module = example("accelerate_fsdp")
    monkeypatch.setitem(sys.modules, "accelerate_fsdp", module)  # pickle checks it is the same
    result = module.main(["--ranks", "2"])
    assert result["distributed_type"] == "DistributedType.MULTI_CPU" and result["trained"] > 0
    assert "2 ranks (DistributedType.MULTI_CPU), FSDP2" in capsys.readouterr().out


# (e) --------------------------------------------------------------------------------------------


def test_the_library_does_not_import_transformers_or_accelerate():
    script = (
        "import sys, decomp, decomp.adapters, optim, optim.wrappers\n"
        "loaded = sorted({'transformers', 'accelerate'} & set(sys.modules))\n"
        "assert not loaded, loaded\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
