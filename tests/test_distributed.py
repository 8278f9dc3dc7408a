"""`delia train` under `accelerate launch` with two CPU processes (DDP over gloo), against the same
arm trained in one process; the shipped launch configs parse with accelerate's own loader."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "run_dir: {run}\nmodel: {{name: {model}, device: {device}}}\narms: [common]\n" \
         "task: {{train_rows: 16, eval_rows: 2}}\ntrain: {{batch_size: 8, micro_batch_size: 2, save_steps: 1}}\n"


def _prepare(tmp_path: Path, model: str, name: str, device: str = "auto") -> Path:
    config = tmp_path / f"{name}.yaml"
    config.write_text(CONFIG.format(run=tmp_path / name, model=model, device=device))
    for verb in ("task", "mix"):
        out = subprocess.run([sys.executable, "-m", "delia.cli", verb, str(config)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
    return config


def _alone_and_launched(tmp_path: Path, model: str, device: str, launch: list[str]) -> tuple[dict, dict]:
    """The common arm trained by `delia train` alone (run `one`) and under `accelerate launch LAUNCH`
    (run `two`): the outputs of both manifests."""
    one, two = _prepare(tmp_path, model, "one", device), _prepare(tmp_path, model, "two", device)
    out = subprocess.run([sys.executable, "-m", "delia.cli", "train", str(one), "--arm", "common"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    launcher = Path(sys.executable).parent / "accelerate"
    out = subprocess.run([str(launcher), "launch", *launch, "-m", "delia.cli", "train", str(two), "--arm", "common"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = (json.loads((tmp_path / n / "train/common/manifest.json").read_text())["outputs"] for n in ("one", "two"))
    return a, b


def test_two_cpu_processes_train_what_one_does(tiny_model_dir, tmp_path):
    # both on the CPU, a GPU or not: the launched processes are (ddp-cpu.yaml's use_cpu)
    a, b = _alone_and_launched(tmp_path, tiny_model_dir, "cpu",
                               ["--config_file", str(ROOT / "configs/accelerate/ddp-cpu.yaml")])
    assert (a["processes"], a["parallel"], b["processes"], b["parallel"]) == (1, "none", 2, "ddp")
    # the global batch is the same: as many steps, every token trained once (summed over the processes)
    assert a["steps"] == b["steps"] == 2
    assert (a["trained_tokens"], a["loss_tokens"]) == (b["trained_tokens"], b["loss_tokens"])
    assert b["first_loss"] == pytest.approx(a["first_loss"], rel=1e-4)
    log = (tmp_path / "two/train/common/loss.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2]  # written once, by the main process
    assert not (tmp_path / "two/train/common/checkpoints").exists()

    from delia.model.loading import load_model
    from delia.model.adapter import load_adapter

    model, _ = load_adapter(*load_model(tiny_model_dir), tmp_path / "two/train/common/adapter")
    assert type(model).__name__ == "PeftModelForCausalLM"


@pytest.mark.parametrize("name, kind", [("ddp.yaml", "MULTI_GPU"), ("ddp-cpu.yaml", "MULTI_GPU"),
                                        ("deepspeed-zero2.yaml", "DEEPSPEED"), ("deepspeed-zero3.yaml", "DEEPSPEED"),
                                        ("fsdp.yaml", "FSDP")])
def test_shipped_launch_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs/accelerate" / name))
    assert config.distributed_type == kind and config.num_processes == 2
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-6])


def test_other_verbs_refuse_to_run_in_several_processes(tmp_path):
    (tmp_path / "c.yaml").write_text(f"run_dir: {tmp_path / 'run'}\n")
    out = subprocess.run([sys.executable, "-m", "delia.cli", "task", str(tmp_path / "c.yaml")], capture_output=True,
                         text=True, env={**os.environ, "WORLD_SIZE": "2", "RANK": "0"})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "only `delia train` runs under" in out.stderr


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name, parallel", [("ddp.yaml", "none"), ("fsdp.yaml", "fsdp"),
                                            ("deepspeed-zero2.yaml", "deepspeed"), ("deepspeed-zero3.yaml", "deepspeed")])
def test_shipped_launch_configs_train_on_one_gpu(tiny_model_dir, tmp_path, name, parallel):
    """Each shipped GPU config, one process on one GPU: the arm trains what `delia train` alone trains."""
    if name.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    a, b = _alone_and_launched(tmp_path, tiny_model_dir, "auto",
                               ["--config_file", str(ROOT / "configs/accelerate" / name), "--num_processes", "1"])
    assert (b["processes"], b["parallel"]) == (1, parallel)
    assert a["steps"] == b["steps"] == 2
    assert (a["trained_tokens"], a["loss_tokens"]) == (b["trained_tokens"], b["loss_tokens"])
    assert b["first_loss"] == pytest.approx(a["first_loss"], rel=2e-2)  # bf16 on both sides

    from delia.model.adapter import load_adapter
    from delia.model.loading import load_model

    model, _ = load_adapter(*load_model(tiny_model_dir), tmp_path / "two/train/common/adapter")
    assert type(model).__name__ == "PeftModelForCausalLM"
