"""Config validation: bad keys, types and values fail at startup with one line naming them."""
import json

import pytest

from conftest import ROOT, TINY_ARGS, run_entry
from minillm.config import DataConfig, ModelConfig, OptimConfig, SampleJobConfig, TokenizerConfig, TrainConfig, TrainJobConfig
from minillm.errors import ConfigError


@pytest.mark.parametrize("override, expected", [
    ("model.n_layr=3", "model.n_layr"),                        # misspelled key
    ("model.n_layer=abc", "model.n_layer"),                    # wrong type
    ("model.n_embd=100", "model.n_embd=100"),                  # not divisible by n_head=4
    ("model.n_kv_head=3", "model.n_head=4"),                   # n_head not divisible by n_kv_head
    ("model.block_size=0", "model.block_size=0"),
    ("optim.lr=-0.1", "optim.lr=-0.1"),
    ("model=nonexistent", "model=nonexistent"),               # unknown group option
    ("tokenizer.model_type=wordpiece", "tokenizer.model_type='wordpiece'"),
    ("device=tpu", "device='tpu'"),
    ("optim.lr=inf", "optim.lr=inf: must be a finite number"),   # passes lr >= 0 unless checked
])
def test_train_entry_rejects_bad_config(override, expected, tmp_path):
    r = run_entry("train.py", override, f"out_dir={tmp_path / 'run'}")
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr          # one line, no traceback
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert not (tmp_path / "run").exists()     # nothing created


@pytest.mark.parametrize("override, expected", [
    ("top_p=0", "top_p=0.0"), ("top_k=-1", "top_k=-1"), ("temperature=-1", "temperature=-1.0"),
    ("prompt=", "prompt=''"),   # what the shell hands over for prompt='' ("max_new_tokens=0", "max_new_tokens=0"),
    ("temperature=nan", "temperature=nan: must be a finite number"),
])
def test_sample_entry_rejects_bad_config(override, expected):
    r = run_entry("sample.py", override)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and expected in lines[0], r.stderr


def test_hydra_conveniences_still_work():
    r = run_entry("train.py", "--cfg", "job", "model=gpt2-small", "train.max_steps=7")
    assert r.returncode == 0, r.stderr
    assert "n_embd: 768" in r.stdout and "max_steps: 7" in r.stdout
    r = run_entry("train.py", "--help")
    assert r.returncode == 0, r.stderr
    assert "model: gpt2-small, llama-small, tiny" in r.stdout
    assert r.stdout.startswith("python train.py [group=option ...] [key=value ...]: train a GPT")  # minillm's page
    assert "powered by Hydra" not in r.stdout and "  n_layer: ${minillm.recipe:model.n_layer}" in r.stdout


def test_dataclass_validation_in_python():
    with pytest.raises(ConfigError, match=r"model\.n_embd=130: must be divisible by model\.n_head=4"):
        ModelConfig(n_embd=130, n_head=4)
    with pytest.raises(ConfigError, match="model.pos"):
        ModelConfig(pos="alibi")
    with pytest.raises(ConfigError, match="rope needs an even head dim"):
        ModelConfig(n_embd=12, n_head=4, pos="rope")
    with pytest.raises(ConfigError, match="optim.beta2"):
        OptimConfig(beta2=1.0)
    with pytest.raises(ConfigError, match="train.grad_accum_steps=0"):
        TrainConfig(grad_accum_steps=0)
    with pytest.raises(ConfigError, match="tokenizer.vocab_size=100"):
        TokenizerConfig(vocab_size=100)   # too small for 256 byte-fallback tokens
    with pytest.raises(ConfigError, match="top_p"):
        SampleJobConfig(top_p=1.5)
    assert ModelConfig(n_head=8, n_kv_head=None, n_embd=64).n_kv_head == 8


@pytest.mark.parametrize("args, expected", [
    (("device=cuda",), "device='cuda': no CUDA device is available"),
    (("seed=4294967296",), "seed=4294967296: must be in [0, 2**32)"),
    (("kernels=triton", "device=cpu"), "kernels='triton': the Triton kernels need a CUDA device"),
    (("train.batch_size=100000",), "fewer than batch_size*world_size=100000 windows"),
])
def test_runtime_problems_are_one_line_errors(args, expected, tmp_path, corpus_file, data_dir):
    env = {"MINILLM_DATA_DIR": str(data_dir), "TRITON_INTERPRET": "0"}
    r = run_entry("train.py", f"data.path={corpus_file}", f"out_dir={tmp_path / 'run'}", *TINY_ARGS, *args, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in r.stderr


def test_multirun_gives_each_job_its_own_run_folder(tmp_path, corpus_file, data_dir):
    out = tmp_path / "sweep"
    r = run_entry("train.py", "-m", "optim.lr=1e-3,3e-3", f"data.path={corpus_file}", f"out_dir={out}",
                  *TINY_ARGS, "train.max_steps=2", env={"MINILLM_DATA_DIR": str(data_dir)})
    assert r.returncode == 0, r.stderr[-2000:]
    lrs = [json.loads((out / str(i) / "config.json").read_text())["optim"]["lr"] for i in (0, 1)]
    assert lrs == [1e-3, 3e-3]
    assert all((out / str(i) / "ckpt" / "latest").is_file() for i in (0, 1))


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from minillm import cli
    cli.register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return OmegaConf.to_object(compose(config_name=name, overrides=overrides))


def test_the_default_yaml_adds_nothing_to_the_dataclass_defaults():
    """Every default lives once, in minillm/config.py: the composed default config is the dataclasses'
    defaults, but for the dataset the data preset names and out_dir (derived from data and model names)."""
    from dataclasses import asdict

    import yaml
    dataset = yaml.safe_load((ROOT / "configs" / "data" / "shakespeare.yaml").read_text())
    assert set(dataset) == {"name", "url", "sha256", "filename"}
    job = _compose("train", [])
    assert asdict(job) == asdict(TrainJobConfig(out_dir="out/shakespeare-tiny", data=DataConfig(**dataset)))
    assert asdict(_compose("sample", [])) == asdict(SampleJobConfig())


@pytest.mark.parametrize("overrides, n_head, n_kv_head", [
    ([], 4, 4), (["model.n_head=8"], 8, 8), (["model=gpt2-small"], 12, 12), (["model=llama-small"], 12, 4),
    (["model=gpt2-small", "model.n_head=6"], 6, 6), (["model.n_kv_head=2"], 4, 2)])
def test_n_kv_head_follows_n_head_unless_set(overrides, n_head, n_kv_head):
    """An unset model.n_kv_head means multi-head attention for whatever n_head ends up being (the
    schema must not freeze the value __post_init__ derives from the default n_head)."""
    job = _compose("train", overrides)
    assert (job.model.n_head, job.model.n_kv_head) == (n_head, n_kv_head)


@pytest.mark.parametrize("build, key", [
    (lambda v: OptimConfig(lr=v), "optim.lr"), (lambda v: OptimConfig(muon_lr=v), "optim.muon_lr"),
    (lambda v: SampleJobConfig(temperature=v), "temperature"),
    (lambda v: SampleJobConfig(repetition_penalty=v), "repetition_penalty"),
    (lambda v: TrainConfig(spike_zscore=v), "train.spike_zscore"),
    (lambda v: ModelConfig(rope_theta=v), "model.rope_theta"),
    (lambda v: DataConfig(val_fraction=v), "data.val_fraction"),
])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf")])
def test_non_finite_floats_are_refused_by_name(build, key, value):
    with pytest.raises(ConfigError, match=rf"^{key}={value!r}: must be a finite number$"):
        build(value)


@pytest.mark.parametrize("sub", ["", "/inner/run"])
def test_out_dir_naming_a_file_is_one_line_and_the_file_is_kept(tmp_path, sub):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    r = run_entry("train.py", f"out_dir={f}{sub}", "train.max_steps=1")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == (f"error: out_dir={f}{sub}: {'it' if not sub else f} is a file, not a folder; choose "
                        "another out_dir (nothing was changed)")
    assert f.read_text() == "mine"


@pytest.mark.parametrize("args, expected", [
    (("--cfg", "job", "model=nope"), "error: model=nope: no such option (available: gpt2-small, llama-small, tiny)"),
    # the experiment group has no default: a misspelled one must fail, not be dropped (the default run trained)
    (("experiment=shakespeare_cpuu",), "error: experiment=shakespeare_cpuu: no such option (available: "
                                       "nanogpt_cpu, shakespeare_cpu)"),
    (("--cfg", "job", "experiment=nope"), "error: experiment=nope: no such option"),
    (("--cfg", "job", "--resolve", "model.n_layr=3"), "error: model.n_layr: unknown key (Key 'n_layr' not in "
                                                      "'ModelConfig'); check the spelling"),
    (("out_dir=null",), "error: out_dir=null: this key needs a value"),
    (("train.max_steps=abc",), "error: train.max_steps=abc: must be an integer"),
    (("optim.lr=fast",), "error: optim.lr=fast: must be a float"),
])
def test_hydra_printing_flags_and_omegaconf_messages_are_one_minillm_line(args, expected, tmp_path):
    r = run_entry("train.py", *args)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), r.stderr


def test_a_sweep_job_that_fails_on_bad_input_leaves_no_empty_job_folder(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    r = run_entry("train.py", "-m", "data=text", f"data.path={tmp_path / 'a.txt'},{tmp_path / 'b.txt'}",
                  f"out_dir={sweep}")
    assert r.returncode == 2 and f"error: data.path={tmp_path / 'a.txt'}: no such file" in r.stderr
    assert sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml"]     # Hydra's record of the sweep only
