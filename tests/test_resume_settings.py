"""A checkpoint continues only the run that wrote it (issue 16 item 3, issue 17 item 4): changed training
settings or changed data are refused in one line naming every key with its old and new value, unless
train.allow_changes=true, which logs them; the run folder keeps every config it has had."""
import json

import pytest

from conftest import TINY_ARGS, run_entry
from minillm import checkpoint as ckpt
from minillm.errors import RunError
from minillm.resume import setting_changes
from minillm.trainer import train
from test_trainer import tiny_cfg


def snapshot(run):
    """Every file of the run folder with its bytes (run.lock excepted)."""
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != "run.lock"}


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, corpus_file):
    """A finished 3-step run and its data cache, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("shared")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILLM_DATA_DIR", str(root / "data_cache"))
        train(tiny_cfg(root / "run", corpus_file, max_steps=3))
    return root


@pytest.fixture
def run3(shared_run, monkeypatch):
    monkeypatch.setenv("MINILLM_DATA_DIR", str(shared_run / "data_cache"))
    return shared_run / "run"


@pytest.fixture
def own_run3(tmp_path, shared_run, monkeypatch):
    """A copy of the shared run that a test may continue."""
    import shutil
    monkeypatch.setenv("MINILLM_DATA_DIR", str(shared_run / "data_cache"))
    shutil.copytree(shared_run / "run", tmp_path / "run", ignore=shutil.ignore_patterns("run.lock"))
    return tmp_path / "run"


@pytest.mark.parametrize("change, expected", [
    (lambda c: setattr(c.train, "max_steps", 6), "train.max_steps 3 -> 6"),
    (lambda c: (setattr(c.optim, "lr", 1e-3), setattr(c.train, "batch_size", 8)),
     "optim.lr 0.003 -> 0.001, global batch (batch_size x grad_accum_steps x processes) 4 -> 8"),
    (lambda c: setattr(c.optim, "schedule", "cosine"), "optim.schedule 'constant' -> 'cosine'"),
])
def test_changed_training_settings_are_refused_naming_old_and_new(run3, corpus_file, change, expected):
    before = snapshot(run3)
    cfg = tiny_cfg(run3, corpus_file, max_steps=3)
    change(cfg)
    with pytest.raises(RunError, match=r"the run was trained with other settings: (.*)") as e:
        train(cfg)
    assert f"other settings: {expected}; " in str(e.value) and "train.allow_changes=true" in str(e.value)
    assert snapshot(run3) == before                                # nothing in the folder changed


def test_allow_changes_continues_logs_and_keeps_every_config(own_run3, corpus_file, caplog):
    run3 = own_run3
    first = json.loads((run3 / "config.json").read_text())
    cfg = tiny_cfg(run3, corpus_file, max_steps=5, allow_changes=True)
    cfg.optim.lr = 1e-3
    caplog.set_level("INFO", logger="minillm")
    summary = train(cfg)
    assert summary["step"] == 5
    assert "changed settings (train.allow_changes=true): optim.lr 0.003 -> 0.001, train.max_steps 3 -> 5" in caplog.text
    assert json.loads((run3 / "config.1.json").read_text()) == first
    now = json.loads((run3 / "config.json").read_text())
    assert now["optim"]["lr"] == 1e-3 and now["train"]["max_steps"] == 5
    # a third part of the run: its predecessor's config is kept too, nothing overwritten
    train(tiny_cfg(run3, corpus_file, max_steps=6, allow_changes=True))
    assert json.loads((run3 / "config.2.json").read_text()) == now
    assert json.loads((run3 / "config.1.json").read_text()) == first


def test_a_relaunch_that_changes_only_launch_options_keeps_no_config_copy(tmp_path):
    """train.resume / train.allow_changes say how a launch found its checkpoint, not what the run is: a
    relaunch changing only them rewrites config.json and adds no config.<k>.json; a real change still does."""
    from minillm.config_history import keep_config_history
    config = {"train": {"resume": "auto", "allow_changes": False, "max_steps": 3}, "seed": 1}
    keep_config_history(tmp_path, config, 0)
    relaunch = {"train": {"resume": "out/x/ckpt/step_000002.pt", "allow_changes": True, "max_steps": 3}, "seed": 1}
    keep_config_history(tmp_path, relaunch, 2)
    assert not list(tmp_path.glob("config.*.json"))
    assert json.loads((tmp_path / "config.json").read_text()) == relaunch
    longer = {"train": {**relaunch["train"], "max_steps": 4}, "seed": 1}
    keep_config_history(tmp_path, longer, 3)
    assert [p.name for p in tmp_path.glob("config.*.json")] == ["config.1.json"]
    assert json.loads((tmp_path / "config.1.json").read_text()) == relaunch
    assert json.loads((tmp_path / "config.json").read_text()) == longer


def test_resume_with_other_tokenizer_settings_is_refused_before_any_preparation(run3, corpus_file, tmp_path,
                                                                                 monkeypatch):
    """A changed tokenizer.* setting trains another tokenizer: refused naming that key (not the model.vocab_size
    it implies), before the tokenizer training and corpus encoding that could only end in the refusal."""
    import minillm.trainer as trainer_mod

    def no_preparation(*a, **k):
        raise AssertionError("the corpus was prepared before the refusal")
    monkeypatch.setattr(trainer_mod, "load_data", no_preparation)
    cfg = tiny_cfg(run3, corpus_file, max_steps=3)
    cfg.tokenizer.vocab_size = 500
    with pytest.raises(RunError, match=r"different tokenizer .*\(tokenizer.vocab_size 400 -> 500\)"):
        train(cfg)
    other = tmp_path / "other.model"                 # another file at tokenizer.path: named as the cause
    other.write_bytes((run3 / "tokenizer.model").read_bytes() + b"x")
    cfg = tiny_cfg(run3, corpus_file, max_steps=3)
    cfg.tokenizer.path = str(other)
    with pytest.raises(RunError, match=rf"tokenizer.path={other} holds another sentencepiece model than the one "
                                       r"this run was trained with; continue it with its own, tokenizer.path="):
        train(cfg)
    monkeypatch.undo()
    monkeypatch.setenv("MINILLM_DATA_DIR", str(run3.parent / "data_cache"))
    own = tiny_cfg(run3, corpus_file, max_steps=3)   # its own tokenizer file passes
    own.tokenizer.path = str(run3 / "tokenizer.model")
    assert train(own)["step"] == 3


def test_a_run_cannot_be_shortened_below_its_step(own_run3, corpus_file):
    """max_steps lowered below the checkpoint's step (allowed as a change) is refused: the run cannot
    end there, and calling it finished would report an evaluation that never ran."""
    (own_run3 / "summary.json").unlink()
    with pytest.raises(RunError, match=r"the run is at step 3, past train.max_steps=2; a run cannot be shortened: "
                                       r"set train.max_steps >= 3 to continue it"):
        train(tiny_cfg(own_run3, corpus_file, max_steps=2, allow_changes=True))
    assert not (own_run3 / "summary.json").exists()
    assert train(tiny_cfg(own_run3, corpus_file, max_steps=3))["step"] == 3  # its own steps: finished


def test_settings_that_do_not_shape_training_may_change(run3, corpus_file):
    cfg = tiny_cfg(run3, corpus_file, max_steps=3, eval_interval=1, log_interval=2, keep_last=3)
    cfg.optim.fused = True
    cfg.tokenizer.num_threads = 1                                    # how fast, not which tokenizer
    assert train(cfg)["step"] == 3                                   # finished: nothing to do, no refusal


@pytest.mark.parametrize("edit", ["append", "inside_val"])
def test_a_corpus_edited_after_the_checkpoint_is_refused(tmp_path, corpus_file, data_dir, edit):
    corpus = tmp_path / "c.txt"
    text = corpus_file.read_text()
    corpus.write_text(text)
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus, max_steps=3, ckpt_interval=3))
    if edit == "append":
        corpus.write_text(text + "nineteen more bytes")
    else:  # one word changed in the last 10% (validation) of the corpus
        at = int(len(text) * 0.95)
        corpus.write_text(text[:at] + text[at:].replace("the", "THE", 1))
    # appending moves the train split (the first 90% of the bytes), so the tokenizer trained on it differs
    # too: refused as another tokenizer, which no key can allow; an edit inside validation keeps it
    expected = (r"different tokenizer than the settings give now \(the corpus was edited\?\); continue it with its "
                r"own tokenizer, tokenizer.path=.*run/tokenizer.model \(then a changed corpus can be allowed"
                if edit == "append" else
                r"data \(prepared tokens\) train \d+ tokens crc [0-9a-f]{8}, val \d+ tokens crc [0-9a-f]{8} -> "
                r"train \d+ tokens crc")
    with pytest.raises(RunError, match=expected):
        train(tiny_cfg(run, corpus, max_steps=3))
    if edit == "inside_val":  # appending also moves the train split, so the tokenizer differs: always refused
        assert train(tiny_cfg(run, corpus, max_steps=3, allow_changes=True))["step"] == 3
    else:                     # ... unless the run keeps its own tokenizer, as the message says
        cfg = tiny_cfg(run, corpus, max_steps=3, allow_changes=True)
        cfg.tokenizer.path = str(run / "tokenizer.model")
        assert train(cfg)["step"] == 3


def test_a_moved_corpus_with_the_same_content_resumes(tmp_path, corpus_file, data_dir):
    run = tmp_path / "run"
    train(tiny_cfg(run, corpus_file, max_steps=2, ckpt_interval=2))
    moved = tmp_path / "elsewhere" / corpus_file.name
    moved.parent.mkdir()
    moved.write_bytes(corpus_file.read_bytes())
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert set(state["data"]) == {"train", "val"} and state["data"]["train"]["count"] > 0
    cfg = tiny_cfg(run, moved, max_steps=2)
    assert train(cfg)["step"] == 2


def test_setting_changes_compares_only_what_shapes_training():
    old = {"seed": 1, "optim": {"lr": 1.0, "fused": None}, "train": {"max_steps": 3, "eval_interval": 5,
           "batch_size": 4, "grad_accum_steps": 2}, "data": {"path": "a"}, "logger": {"progress": True}}
    new = json.loads(json.dumps(old))
    new["optim"]["fused"], new["train"]["eval_interval"], new["data"]["path"] = True, 1, "b"
    new["logger"]["progress"] = False
    assert setting_changes(old, new) == {}
    new["train"]["grad_accum_steps"] = 4
    assert setting_changes(old, new) == {"global batch (batch_size x grad_accum_steps x processes)": (8, 16)}
    assert setting_changes(old, new, saved_world=2, world=1) == {}   # 4 x 2 x 2 processes = 4 x 4 x 1
    new["train"]["grad_accum_steps"] = 2
    new["optim"]["muon_lr"] = 0.5                                      # a key the checkpoint predates
    assert setting_changes(old, new) == {}
    new["optim"]["lr"], new["seed"] = 2.0, 5
    assert setting_changes(old, new) == {"seed": (1, 5), "optim.lr": (1.0, 2.0)}


@pytest.mark.slow  # two -m sweeps in subprocesses (~35 s); the refusal itself is tested above
def test_a_sweep_into_a_folder_of_finished_jobs_with_other_values_is_refused(tmp_path, corpus_file, data_dir):
    common = ("-m", f"data.path={corpus_file}", f"out_dir={tmp_path / 'sweep'}", *TINY_ARGS,
              "train.max_steps=2", "train.eval_interval=0", "device=cpu")
    first = run_entry("train.py", *common, "optim.lr=1e-2")
    assert first.returncode == 0, first.stderr
    second = run_entry("train.py", *common, "optim.lr=3e-2")
    assert second.returncode == 2, second.stderr
    assert "optim.lr 0.01 -> 0.03" in second.stderr and "nothing to do" not in second.stderr
