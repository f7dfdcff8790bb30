"""Hugging Face datasets as a corpus (data.hf_dataset), offline: a DatasetDict and a Dataset saved with
save_to_disk, and a local folder of parquet / jsonl files in the hub's layout. Each prepared split decodes
to exactly its rows' texts (Chinese, emoji, empty rows skipped), separated by eos; validation is a split
or the last fraction of the rows; the cache key follows the data; bad input is one line."""
import logging
import math
import os
import sys
import tempfile

os.environ["HF_DATASETS_OFFLINE"] = "1"  # read by datasets at import: set before it is imported
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

datasets = pytest.importorskip("datasets")

from conftest import ROOT, TINY_ARGS, make_corpus, run_entry  # noqa: E402
from minillm.config import DataConfig, TokenizerConfig  # noqa: E402
from minillm.data.hf_dataset import HFSplit  # noqa: E402
from minillm.data.prepare import prepare  # noqa: E402
from minillm.data.token_file import read_tokens  # noqa: E402
from minillm.errors import ConfigError, DataError  # noqa: E402
from minillm.tokenizer import EOS_ID, Tokenizer  # noqa: E402

TOK = TokenizerConfig(vocab_size=400)
TRAIN = [make_corpus(80, seed=1), "红楼梦 第一回 甄士隐梦幻识通灵\n贾雨村风尘怀闺秀。", "",
         "emoji 😀🎉 👩\u200d👩\u200d👧 and \"quotes\"\tand ▁ literal\n\n", "  spaces  ", make_corpus(60, seed=2) + "终。"]
VAL = ["held-out 文本 🙂\n", make_corpus(10, seed=3)]


@pytest.fixture(autouse=True)
def offline(monkeypatch, data_dir):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def documents(p, split="train"):
    """The documents of a prepared split: its ids cut at eos, each decoded."""
    tok = Tokenizer.load(p.tokenizer)
    ids = np.array(read_tokens(getattr(p, split), tok.vocab_size))
    return [tok.decode(x[x != EOS_ID]) for x in np.split(ids, np.flatnonzero(ids == EOS_ID))]


def saved_dict(path, train=TRAIN, val=VAL, field="text"):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({field: train, "id": list(range(len(train)))}),
                          "validation": datasets.Dataset.from_dict({field: val})}).save_to_disk(str(path))
    return path


def prep(**kw):
    return prepare(DataConfig(num_workers=1, **kw), TOK, progress=False)


def test_saved_dataset_dict_round_trips_with_a_validation_split(tmp_path):
    p = prep(hf_dataset=str(saved_dict(tmp_path / "ds")), hf_val_split="validation")
    assert documents(p) == [t for t in TRAIN if t] and documents(p, "val") == VAL
    tok = Tokenizer.load(p.tokenizer)
    ids = np.array(read_tokens(p.train, tok.vocab_size))
    assert int((ids == EOS_ID).sum()) == 4 and tok.decode(ids) == "".join(t for t in TRAIN)  # eos decodes to ""
    m = p.meta
    assert (m["train_documents"], m["val_documents"], m["empty_documents"]) == (5, 2, 1)
    assert m["train_bytes"] == sum(len(t.encode()) for t in TRAIN) and m["hf"]["split"] is None
    assert m["hf"]["kind"] == "disk" and m["hf"]["val_split"] == "validation" and m["val_fraction"] is None


def test_saved_dataset_val_fraction_is_the_last_rows_whole(tmp_path, monkeypatch):
    rows = [make_corpus(30, seed=s) for s in range(10)]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "one"), num_shards=3)  # read in order
    # a saved dataset's Arrow files are read as streams, not through its memory map (bounded RSS)
    monkeypatch.setattr(datasets.Dataset, "iter", lambda *a, **k: pytest.fail("read through the memory map"))
    p = prep(hf_dataset=str(tmp_path / "one"), val_fraction=0.25)
    train, val = documents(p), documents(p, "val")
    assert train + val == rows and len(val) in (2, 3)  # whole rows: the one holding the cut byte starts val


def test_local_folder_of_parquet_and_jsonl_in_the_hub_layout(tmp_path):
    folder = tmp_path / "local"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": TRAIN[:3]}), folder / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": TRAIN[3:]}), folder / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": VAL}), folder / "data" / "test-00000-of-00001.parquet")
    p = prep(hf_dataset=str(folder), hf_val_split="test")
    assert documents(p) == [t for t in TRAIN if t] and documents(p, "val") == VAL and p.meta["hf"]["kind"] == "folder"

    jfolder = tmp_path / "jl"
    jfolder.mkdir()
    datasets.Dataset.from_dict({"meta": [{"body": t} for t in VAL + TRAIN]}).to_json(str(jfolder / "train.jsonl"))
    q = prep(hf_dataset=str(jfolder), text_field="meta.body", val_fraction=0.2)
    assert documents(q) + documents(q, "val") == [t for t in VAL + TRAIN if t]


def test_cache_is_reused_and_keyed_by_files_split_and_field(tmp_path):
    ds = saved_dict(tmp_path / "ds")
    first = prep(hf_dataset=str(ds), hf_val_split="validation")
    mtime = first.train.stat().st_mtime_ns
    again = prep(hf_dataset=str(ds), hf_val_split="validation")
    assert again.dir == first.dir and again.train.stat().st_mtime_ns == mtime
    assert prep(hf_dataset=str(ds)).dir != first.dir  # val_fraction instead of a split
    saved_dict(tmp_path / "ds2", train=TRAIN, field="body")
    other_field = prep(hf_dataset=str(tmp_path / "ds2"), hf_val_split="validation", text_field="body")
    assert other_field.dir != first.dir
    saved_dict(ds, train=TRAIN[:-1] + [TRAIN[-1].replace("终", "始")])  # an edit in place, same size: a fresh entry
    edited = prep(hf_dataset=str(ds), hf_val_split="validation")
    assert edited.dir != first.dir and documents(edited)[-1].endswith("始。")


def test_the_cache_hit_reads_no_row(tmp_path, monkeypatch):
    ds = saved_dict(tmp_path / "ds")
    prep(hf_dataset=str(ds), hf_val_split="validation")
    monkeypatch.setattr(HFSplit, "records", lambda *a: pytest.fail("rows read on a cache hit"))
    assert prep(hf_dataset=str(ds), hf_val_split="validation").meta["train_documents"] == 5


def no_entry(data_dir):
    return not (data_dir / "prepared").exists() or not [p for p in (data_dir / "prepared").iterdir()]


@pytest.mark.parametrize("kw, message", [
    (dict(text_field="body"), r"ds: no column 'body' \(columns: text, id\); set data.text_field \(train_tokenizer: --text-field\) to "
                              r"the column that holds the text$"),
    (dict(hf_split="test"), r"no such split \(it has train, validation\); set data.hf_split"),
    (dict(hf_config="en"), r"data.hf_config=en: a dataset saved with save_to_disk .* has no configurations"),
])
def test_bad_settings_are_one_line_and_leave_no_cache(tmp_path, data_dir, kw, message):
    with pytest.raises(DataError, match=message) as e:
        prep(hf_dataset=str(saved_dict(tmp_path / "ds")), **kw)
    assert "\n" not in str(e.value) and no_entry(data_dir)


def test_bad_rows_name_the_row_or_are_skipped_and_counted(tmp_path, data_dir, caplog):
    good = [make_corpus(30, seed=4), make_corpus(60, seed=5)]
    datasets.Dataset.from_dict({"text": [good[0], None, good[1]]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad: row 1: field 'text' is null, not a string; .*\(or set data.skip_invalid=true "):
        prep(hf_dataset=str(tmp_path / "bad"))
    assert no_entry(data_dir)
    p = prep(hf_dataset=str(tmp_path / "bad"), skip_invalid=True, val_fraction=0.3)
    assert documents(p) + documents(p, "val") == good
    assert list(p.meta["skipped_records"].values()) == [1] and "skipped 1 bad rows" in caplog.text


def test_a_damaged_arrow_file_is_one_line(tmp_path, data_dir):
    ds = saved_dict(tmp_path / "ds")
    [arrow] = (ds / "train").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:-300])
    with pytest.raises(DataError, match=r"data.hf_dataset=.*ds: cannot be opened \(OSError: .*\); save the dataset "
                                        r"again \(save_to_disk\), or check data.hf_dataset and data.hf_split$") as e:
        prep(hf_dataset=str(ds), hf_val_split="validation")
    assert "\n" not in str(e.value) and no_entry(data_dir)


def test_missing_paths_and_an_offline_hub_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"data.hf_dataset=.*nope: no such folder"):
        prep(hf_dataset=str(tmp_path / "nope"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match=r"is a file, not a dataset folder; .* use data.path for files"):
        prep(hf_dataset=str(tmp_path / "f.txt"))
    with pytest.raises(DataError, match=r"data.hf_dataset=someone/no-such-dataset \(split train\): cannot be "
                                        r"opened \(.*\) \(HF_HUB_OFFLINE is set and no copy is cached: unset it to "
                                        r"download the dataset, or give a local folder\); check data.hf_dataset") as e:
        prep(hf_dataset="someone/no-such-dataset")
    assert "\n" not in str(e.value)


def test_an_unreachable_hub_says_what_to_do_without_a_network(monkeypatch, caplog):
    """HF_HUB_OFFLINE unset and no network: the hint names both ways to work offline, and huggingface_hub's
    retry warnings are held back (the error says it all)."""
    def unreachable(name, *a, **k):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    level = logging.getLogger("huggingface_hub").level
    with pytest.raises(DataError) as e:
        HFSplit("someone/data", "hub", None, None).open()
    assert str(e.value) == ("data.hf_dataset=someone/data (split train): cannot be opened (ConnectionError: Couldn't "
                            "reach 'someone/data' on the Hub (LocalEntryNotFoundError)) (a hub dataset is downloaded: "
                            "with no network, use a cached copy with HF_HUB_OFFLINE=1, or a local folder); check "
                            "data.hf_dataset, data.hf_config and data.hf_split")
    assert "Retrying" not in caplog.text
    assert logging.getLogger("huggingface_hub").level == level   # put back as it was


def test_an_unreachable_hub_is_tried_once_by_the_checking_pass(monkeypatch):
    """The checking pass with its progress bar asks for the row count first: an unreachable hub must fail
    there, not be waited on a second time (huggingface_hub retries each open with backoff)."""
    from minillm.data.hf_dataset import check_split
    calls = []

    def unreachable(name, *a, **k):
        calls.append(name)
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="cannot be opened"):
        check_split(HFSplit("someone/data", "hub", None, None), "text", False, progress=True, fingerprint="x")
    assert calls == ["someone/data"]


@pytest.mark.parametrize("saved", [False, True])
def test_a_missing_validation_split_names_its_key_and_the_splits(tmp_path, data_dir, saved):
    if saved:
        ds = saved_dict(tmp_path / "ds")
    else:
        (ds := tmp_path / "jl").mkdir()
        datasets.Dataset.from_dict({"text": TRAIN}).to_json(str(ds / "train.jsonl"))
    has = "train, validation" if saved else "train"
    with pytest.raises(DataError) as e:
        prep(hf_dataset=str(ds), hf_val_split="valid")
    assert str(e.value) == (f"data.hf_dataset={ds} (split valid): no such split (it has {has}); set data.hf_val_split "
                            "to one of them or leave it unset (data.val_fraction holds out rows)")
    with pytest.raises(DataError, match=rf"\(split tr\): no such split \(it has {has}\); set data.hf_split to one "
                                        r"of them$"):
        prep(hf_dataset=str(ds), hf_split="tr")
    assert no_entry(data_dir)


@pytest.mark.parametrize("whole", [True, False])
def test_a_saved_dataset_given_as_files_says_to_read_it_as_one(tmp_path, data_dir, whole):
    """data.path at a save_to_disk folder (or one of its .arrow files): the fix is data=hf, in one line."""
    ds = saved_dict(tmp_path / "ds")
    datasets.Dataset.from_dict({"text": TRAIN}).save_to_disk(str(tmp_path / "one"))
    for folder, arrow in ((ds, next((ds / "train").glob("*.arrow"))),                    # a DatasetDict
                          (tmp_path / "one", next((tmp_path / "one").glob("*.arrow")))):  # a Dataset
        for skip_invalid in (False, True) if whole else (False,):  # a folder: refused even when skipping
            with pytest.raises(DataError) as e:
                prep(path=str(folder if whole else arrow), skip_invalid=skip_invalid)
            if whole:
                assert str(e.value) == (f"data.path={folder}: a dataset saved with Hugging Face datasets "
                                        f"(save_to_disk), not text files; read it with data=hf data.hf_dataset={folder}")
            else:
                assert str(e.value).startswith(
                    f"{arrow}: looks like part of a dataset saved with Hugging Face datasets (save_to_disk), not "
                    f"text; read it with data=hf data.hf_dataset={folder} ")
            assert "\n" not in str(e.value) and no_entry(data_dir)


def test_a_text_folder_with_a_state_json_is_not_taken_for_a_saved_dataset(tmp_path, data_dir):
    """Only save_to_disk's whole layout (state.json and dataset_info.json beside .arrow files) is refused."""
    from minillm.data.corpus import expand_paths, is_saved_dataset
    (folder := tmp_path / "texts").mkdir()
    (folder / "a.txt").write_text("a text corpus\n" * 50)
    (folder / "state.json").write_text('{"page": 3}')
    assert not is_saved_dataset(folder)
    assert expand_paths(str(folder), "data.path") == [folder / "a.txt", folder / "state.json"]


def test_a_saved_dataset_elsewhere_than_data_path_gets_advice_for_that_key(tmp_path):
    """data.val_path and train_tokenizer's --input cannot take data=hf: the advice fits the key."""
    from minillm.data.corpus import expand_paths
    datasets.Dataset.from_dict({"text": TRAIN}).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError, match=r"^data.val_path=.*: a dataset saved with Hugging Face datasets \(save_to_disk\), "
                                        r"not text files; with data=hf its training split can be read from it too"):
        expand_paths(str(tmp_path / "one"), "data.val_path")
    with pytest.raises(DataError, match=r"^--input=.*not text files; write it out as JSONL \(datasets' "
                                        r"Dataset.to_json\) and give that file$"):
        expand_paths(str(tmp_path / "one"), "--input")


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="data.hf_split='train': applies only with data.hf_dataset"):
        DataConfig(hf_split="train")
    with pytest.raises(ConfigError, match="data.hf_dataset='d': conflicts with data.path=a.txt"):
        DataConfig(path="a.txt", hf_dataset="d")
    with pytest.raises(ConfigError, match="data.hf_val_split='train': is the training split too"):
        DataConfig(hf_dataset="d", hf_val_split="train")
    with pytest.raises(ConfigError, match="data.hf_val_split='v': conflicts with data.val_path=v.txt"):
        DataConfig(hf_dataset="d", hf_val_split="v", val_path="v.txt")


def test_without_the_datasets_library_train_py_says_what_to_install(tmp_path):
    """train.py with data=hf where `import datasets` fails: one line naming the extra, exit 2."""
    fake = tmp_path / "site"
    (fake / "datasets").mkdir(parents=True)
    (fake / "datasets" / "__init__.py").write_text("raise ImportError('No module named datasets')\n")
    ds = tmp_path / "ds"
    (ds).mkdir()
    (ds / "state.json").write_text("{}")
    env = {"PYTHONPATH": f"{fake}{os.pathsep}{ROOT}", "MINILLM_DATA_DIR": str(tmp_path / "cache")}
    proc = run_entry("train.py", "data=hf", f"data.hf_dataset={ds}", f"out_dir={tmp_path / 'run'}", *TINY_ARGS,
                     env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ('error: data.hf_dataset needs the Hugging Face datasets library, '
                                                    'which is not installed; install it with pip install -e ".[hf]"')
    assert not (tmp_path / "cache" / "prepared").exists() or not list((tmp_path / "cache" / "prepared").iterdir())
    assert "datasets" not in sys.modules or sys.modules["datasets"] is datasets  # this process untouched


def test_files_alone_never_import_datasets_or_torch(tmp_path):
    """datasets is imported only when data.hf_dataset is set; preparing files loads neither it nor torch."""
    import subprocess
    (tmp_path / "c.txt").write_text(make_corpus(200))
    code = ("import sys; from minillm.config import DataConfig, TokenizerConfig; from minillm.data.prepare import prepare; "
            f"prepare(DataConfig(path={str(tmp_path / 'c.txt')!r}, num_workers=1), TokenizerConfig(vocab_size=400), "
            "progress=False); print(sorted(m for m in ('datasets', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "MINILLM_DATA_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def chinese_rows(n: int, seed: int = 0) -> list[str]:
    """n documents of Zipf-distributed Han characters (a CJK corpus's statistics), 200 characters each."""
    import random
    rng = random.Random(seed)
    chars = [chr(0x4E00 + i) for i in range(3000)]
    return ["".join(rng.choices(chars, [1 / (i + 1) for i in range(3000)], k=199)) + "。" for _ in range(n)]


def test_the_budget_recipe_sizes_a_dataset_from_its_rows(tmp_path, monkeypatch):
    """A time budget on data.hf_dataset: the recipe reads the training split's text as it reads files (a
    CJK vocabulary for Chinese rows, the epoch cap from its size); a split larger than the sample is
    sized as rows x the sample's bytes per row; an unreadable dataset leaves the recipe its defaults."""
    from minillm import recipe
    rows = chinese_rows(300)
    ds = saved_dict(tmp_path / "zh", train=rows, val=rows[:5])
    data = DataConfig(hf_dataset=str(ds), hf_val_split="validation")
    recipe._stats_of.cache_clear()
    stats = recipe.corpus_stats(data)
    assert stats.bytes == sum(len(r.encode()) for r in rows) and stats.sample_chars == sum(map(len, rows))
    assert recipe.vocab_for(stats) >= recipe.CJK_VOCAB
    per_step = 32 * 32
    assert recipe.epoch_cap(stats, data, per_step) == math.ceil(      # the validation split is held out
        recipe.MAX_EPOCHS * stats.bytes / recipe.BYTES_PER_TOKEN[1] / per_step)
    fraction = DataConfig(hf_dataset=str(ds), val_fraction=0.5)
    assert recipe.epoch_cap(stats, fraction, per_step) == math.ceil(
        recipe.MAX_EPOCHS * stats.bytes * 0.5 / recipe.BYTES_PER_TOKEN[1] / per_step)

    monkeypatch.setattr(recipe, "SAMPLE_BYTES", 20 * len(rows[0].encode()))  # 20 of the 300 rows
    recipe._stats_of.cache_clear()
    sampled = recipe.corpus_stats(data)
    assert sampled.sample_chars == 20 * 200 and sampled.bytes == stats.bytes  # equal-sized rows: exact

    # a folder of jsonl files whose sample is part of the split and whose rows are unknown until read:
    # the training split's own file bytes (not the other splits', not the README)
    import json
    folder = tmp_path / "folder"
    (folder / "data").mkdir(parents=True)
    for name, part in (("train", rows), ("validation", rows[:30]), ("test", rows[:30])):
        (folder / "data" / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in part))
    (folder / "README.md").write_text("x" * 100_000)
    recipe._stats_of.cache_clear()
    in_folder = recipe.corpus_stats(DataConfig(hf_dataset=str(folder), hf_val_split="validation"))
    assert in_folder.sample_chars == 20 * 200 and in_folder.bytes == (folder / "data" / "train.jsonl").stat().st_size
    assert recipe.vocab_for(in_folder) >= recipe.CJK_VOCAB

    recipe._stats_of.cache_clear()
    assert recipe.corpus_stats(DataConfig(hf_dataset="someone/no-such-dataset")) is None  # a hub dataset: not read
    assert recipe.corpus_stats(DataConfig(hf_dataset=str(tmp_path / "nope"))) is None
    recipe._stats_of.cache_clear()


def test_the_recipe_never_opens_a_hub_dataset(monkeypatch):
    """A hub dataset is not read while the config resolves (every process, the network, inside the time
    budget; the choice must not change with the network): the recipe's defaults, nothing opened."""
    from minillm import recipe
    from minillm.data import hf_dataset
    opened = []
    monkeypatch.setattr(hf_dataset.HFSplit, "open", lambda self: opened.append(self) or 1 / 0)
    recipe._stats_of.cache_clear()
    assert recipe.corpus_stats(DataConfig(hf_dataset="someone/some-dataset")) is None and opened == []
    recipe._stats_of.cache_clear()
