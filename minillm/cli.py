"""Glue between Hydra and the library, shared by the two entry points (train.py, sample.py).

This is the only module of minillm that knows Hydra exists; the library below takes dataclasses.
It turns every configuration or input mistake into one line on stderr and a nonzero exit:

* ``precheck`` composes the config once before Hydra runs, because Hydra reports an unknown key or a
  wrong type as a multi-line block; here it becomes ``error: model.n_layr: unknown key ...``.
* ``to_dataclass`` converts the composed config into the schema dataclass, whose ``__post_init__``
  validates values (n_embd divisible by n_head, lr >= 0, ...).
* ``literal_strings`` makes every value given to a string key reach the program unchanged (CJK, ``=``,
  commas, quotes, brackets, ``$``, spaces): Hydra's override grammar would reject or reinterpret them.
* ``user_errors`` catches the library's input errors (minillm.errors.UserError: missing corpus, bad
  checkpoint, ...).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import sys
import typing
from pathlib import Path
from typing import Iterator, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from minillm import recipe
from minillm.atomic_files import blocking_file
from minillm.config import SampleJobConfig, TrainJobConfig
from minillm.data.formats import COMPRESSIONS, RECORD_FORMATS
from minillm.errors import ConfigError, UserError

T = TypeVar("T")
EXIT_USER_ERROR = 2


def register_schemas() -> None:
    if not OmegaConf.has_resolver("minillm.corpus_name"):
        OmegaConf.register_new_resolver("minillm.corpus_name", corpus_name)
    if not OmegaConf.has_resolver("minillm.recipe"):  # a time-budgeted run's choices (minillm/recipe.py)
        OmegaConf.register_new_resolver("minillm.recipe", recipe.resolve)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=schema(TrainJobConfig))
    cs.store(name="sample_schema", node=schema(SampleJobConfig))


# Suffixes a compressed corpus file's name may carry under its compression's (docs.txt.gz), besides the
# record formats': dropped from the run's default name with it.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".json", ".csv", ".tsv")


def corpus_name(name: str, path: str | None, hf_dataset: str | None = None, filename: str | None = None) -> str:
    """The default run name's corpus part, ``${minillm.corpus_name:${data.name},${data.path},${data.hf_dataset},
    ${data.filename}}`` in configs/train.yaml: data.name, except where data.path points at another corpus
    (data=text; or a named dataset given a path that is not its file), named by what it points at (a
    file's stem, less a compression's suffix too: docs.jsonl.gz is docs; a folder's name, a glob's last
    fixed folder), and for data=hf, where it is the dataset
    folder's name (a hub name's last part), so each corpus gets its own out_dir."""
    if name == "hf" and hf_dataset:
        return re.sub(r"[^\w.-]+", "_", Path(str(hf_dataset)).expanduser().name).strip("._") or name
    if not path or (filename and Path(str(path)).name == filename):  # the named dataset's own file
        return name
    p = Path(str(path)).expanduser()
    while p.name and any(c in p.name for c in "*?["):  # a glob: the folder before its first wildcard
        p = p.parent
    stem = p.name if p.is_dir() else p.stem
    inner = Path(stem).suffix.lower()  # docs.jsonl.gz: docs (the compression's suffix, then the format's)
    if not p.is_dir() and p.suffix.lower() in COMPRESSIONS and inner in (*RECORD_FORMATS, *TEXT_SUFFIXES):
        stem = Path(stem).stem
    return re.sub(r"[^\w.-]+", "_", stem).strip("._") or name


def schema(cls: type) -> DictConfig:
    """The structured config of ``cls`` holding every field's declared default.

    OmegaConf builds a nested dataclass default by calling its factory, which runs __post_init__; a
    value derived there (model.n_kv_head = model.n_head when unset) would become a fixed default and
    ignore overrides of the key it derives from. The declared defaults are put back here, so deriving
    happens once, in the dataclass built from the composed config.
    """
    node = OmegaConf.structured(cls)
    _declared_defaults(node, cls)
    return node


def _declared_defaults(node: DictConfig, cls: type) -> None:
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            node[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(sub := f.default_factory()):
            _declared_defaults(node[f.name], type(sub))


def string_keys(cls: type, prefix: str = "") -> dict[str, bool]:
    """Every key of the schema ``cls`` that holds text, dotted, mapped to whether it holds a list of
    strings (``stop``) rather than one string (prompt, every path, out_dir, ckpt, field names, ...)."""
    keys: dict[str, bool] = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys.update(string_keys(hint, f"{prefix}{name}."))
        elif hint in (str, typing.Optional[str]):
            keys[prefix + name] = False
        elif hint in (list[str], typing.List[str]):
            keys[prefix + name] = True
    return keys


def literal_strings(argv: list[str], cls: type) -> list[str]:
    """``argv`` with every ``key=value`` override of a string key of ``cls`` quoted for Hydra, so the
    program receives exactly the characters the shell handed over.

    Hydra parses override values with its own grammar (https://hydra.cc/docs/advanced/override_grammar/
    basic/): ``prompt=宝玉笑道`` fails to lex, ``a,b`` is a sweep, ``${..}`` an interpolation, quotes are
    stripped. Kept as grammar: ``null`` (unset an optional key), a list written ``[...]`` for a list key,
    and, under ``-m``, a value with a comma (a sweep: ``data.path=a.txt,b.txt``). Such a value that
    does not parse fails in one line that shows how to quote it.
    """
    keys = string_keys(cls)
    sweep = any(a in ("-m", "--multirun") for a in argv)
    return [_literal(arg, keys, sweep) for arg in argv]


def _literal(arg: str, keys: dict[str, bool], sweep: bool) -> str:
    key, eq, value = arg.partition("=")
    name = key.lstrip("+")
    if arg.startswith("-") or not eq or name not in keys or value.lower() == "null":
        return arg
    is_list = keys[name]
    if (is_list and value.startswith("[")) or (sweep and "," in value):
        _check_grammar(arg, name, value)  # the user wrote Hydra syntax: a list, or a -m sweep
        return arg
    return f"{key}=[{_quote(value)}]" if is_list else f"{key}={_quote(value)}"


def _quote(value: str) -> str:
    """``value`` as a Hydra quoted string that OmegaConf reads back unchanged: quotes escaped by Hydra's
    own rule, and ``${`` escaped (with the backslashes before it) so it is no interpolation."""
    from hydra.core.override_parser.types import Quote, QuotedString

    value = re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", value)
    return QuotedString(text=value, quote=Quote.single).with_quotes()


def _check_grammar(arg: str, name: str, value: str) -> None:
    """One line (exit 2) when a value written in Hydra's grammar (a list, a -m sweep) does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([arg])
    except Exception:
        if value.startswith("["):
            fail(f"{arg}: Hydra reads this value as a list and cannot parse it; quote each item, e.g. in "
                 f"the shell: \"{name}=['first item','second, with a comma']\"")
        fail(f"{arg}: under -m, Hydra reads commas as separating sweep values and cannot parse this; "
             f"quote each value, e.g. in the shell: \"{name}='a (1).txt','b.txt'\", or drop -m for one run")


def fail(message: str) -> None:
    """Print one line and exit nonzero: the way every user error leaves the program."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def format_error(e: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition or validation error."""
    for x in _chain(e):
        if isinstance(x, ConfigError):
            return str(x)
    for x in _chain(e):
        if isinstance(x, OmegaConfBaseException) and getattr(x, "full_key", None):
            return _omegaconf_line(x.full_key, str(getattr(x, "msg", "") or x).strip().splitlines()[0],
                                   isinstance(x, ConfigKeyError))
    text = str(e).strip()
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group = missing.group(1).split("/")[0]
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        return f"{group}={missing.group(1).split('/')[-1]}: no such option" + (
            f" (available: {', '.join(options)})" if options else "")
    return " ".join(text.split())


def _omegaconf_line(key: str, msg: str, unknown: bool) -> str:
    """OmegaConf's message for ``key`` as minillm's one line: what is wrong and what to do."""
    if unknown or re.search(r"Key '[^']+' not in '", msg):
        return f"{key}: unknown key ({msg}); check the spelling (`--cfg job` prints every key)"
    if "is not Optional" in msg:
        return f"{key}=null: this key needs a value (`--cfg job` shows its default)"
    wrong = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", msg)
    if wrong:
        return f"{key}={wrong.group(1)}: must be {'an' if wrong.group(2)[0] in 'AEIOU' else 'a'} {wrong.group(2).lower()}"
    return f"{key}: {msg}"


def precheck(config_dir: Path, config_name: str, argv: list[str]) -> None:
    """Compose the config as Hydra will and fail in one line if it is wrong.

    With ``--cfg``/``--resolve``/``--package`` the overrides are checked the same way (Hydra only prints
    the config then); skipped for -m sweeps and the flags that print help or information.
    """
    argv = _printing_flags_removed(argv)
    if argv is None:
        return
    from hydra import compose, initialize_config_dir

    schema = {"train": TrainJobConfig, "sample": SampleJobConfig}[config_name]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name=config_name, overrides=argv)
        job = OmegaConf.to_object(cfg)
        if not isinstance(job, schema):
            fail(f"{config_name}.yaml does not compose to {schema.__name__}")
        if isinstance(job, TrainJobConfig):
            check_out_dir(job.out_dir)
    except ConfigError as e:
        fail(str(e))
    except Exception as e:  # Hydra and OmegaConf raise many types for bad overrides
        fail(format_error(e))


def check_out_dir(out_dir: str) -> None:
    """One line (exit 2) when out_dir, or a folder above it, is a file: Hydra would fail creating it."""
    path = Path(out_dir).expanduser()
    if (p := blocking_file(path)) is not None:
        fail(f"out_dir={out_dir}: {'it' if p == path else p} is a file, not a folder; choose another "
             "out_dir (nothing was changed)")


_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p")  # Hydra flags that print the config, with their value


def _printing_flags_removed(argv: list[str]) -> list[str] | None:
    """The overrides of ``argv`` without the flags that only print the config; None when another Hydra
    flag is present (-m, --help, --info, --config-name, ...): Hydra handles those itself."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in _VALUE_FLAGS:
            skip = True
        elif a == "--resolve" or a.startswith(("--cfg=", "--package=")):
            continue
        elif a.startswith("-"):
            return None
        else:
            out.append(a)
    return out


def to_dataclass(cfg: DictConfig, cls: type[T]) -> T:
    """The validated schema object for a composed config (one-line exit if a value is impossible)."""
    try:
        obj = OmegaConf.to_object(cfg)
    except (ConfigError, OmegaConfBaseException) as e:
        fail(format_error(e))
    if not isinstance(obj, cls):
        fail(f"config did not compose to {cls.__name__}")
    return obj


def log_recipe(cfg: DictConfig, job: TrainJobConfig) -> None:
    """A time-budgeted run: log the keys the budget recipe chose (those the user left to it) and why."""
    if not job.train.time_budget_s:
        return
    raw, values = OmegaConf.to_container(cfg, resolve=False), dataclasses.asdict(job)
    chosen = {f"{section}.{key}": values[section][key] for section in ("model", "tokenizer", "optim", "train")
              for key, v in raw[section].items() if isinstance(v, str) and v.startswith("${minillm.recipe:")}
    logging.getLogger("minillm.recipe").info(
        "%s", recipe.describe(chosen, recipe.corpus_stats(job.data), job.train.time_budget_s))


def in_sweep() -> bool:
    """Whether this process runs a job of a -m sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_dir(out_dir: str) -> str:
    """The run folder: ``out_dir``, or ``out_dir/<job number>`` for each job of a -m sweep."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if in_sweep() else out_dir


def setup_logging(rank: int = 0) -> None:
    """minillm's messages on stderr, plain; ranks other than 0 only report warnings."""
    logger = logging.getLogger("minillm")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


@contextlib.contextmanager
def user_errors(made_by_hydra: str | None = None) -> Iterator[None]:
    """Turn the library's input errors (minillm.errors.UserError) into one line and a nonzero exit;
    bugs keep their traceback. ``made_by_hydra``: a -m job's folder, which Hydra creates before the job
    runs; removed when the job fails and left it empty."""
    try:
        yield
    except UserError as e:
        if made_by_hydra is not None:
            with contextlib.suppress(OSError):
                Path(made_by_hydra).rmdir()  # only if empty
        fail(str(e))
