"""A run folder's config.json, and the earlier versions it replaced (config.1.json, config.2.json, ...).

Each launch of a run writes the config it runs with; a run continued with other settings
(train.allow_changes) keeps the record of every part of it. Written atomically (atomic_files).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from minillm.atomic_files import write_run_file

log = logging.getLogger(__name__)


# How a launch found and treated its checkpoint, not what the run is: a change in these alone keeps no
# config.<k>.json (every relaunch with another train.resume path would otherwise add one).
LAUNCH_KEYS = (("train", "resume"), ("train", "allow_changes"))


def keep_config_history(run_dir: Path, config: dict, step: int) -> None:
    """Write config.json; a config.json already there that differs in more than LAUNCH_KEYS (an earlier
    part of the run, continued with train.allow_changes) is kept as config.<k>.json, k = 1, 2, ... in order."""
    path, text = run_dir / "config.json", json.dumps(config, indent=2)
    old = path.read_text() if path.exists() else None
    if old is not None and old != text and _run_settings(old) != _run_settings(text):
        k = 1
        while (run_dir / f"config.{k}.json").exists():
            k += 1
        write_run_file(run_dir / f"config.{k}.json", old)  # a copy first: never lost
        log.info("config.json changed at step %d; the previous one is kept as config.%d.json", step, k)
    write_run_file(path, text)  # atomic; a full disk or read-only folder is one line


def _run_settings(text: str) -> dict | None:
    """A config.json without its LAUNCH_KEYS (None if it is not a JSON object: then it is kept)."""
    try:
        config = json.loads(text)
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    for group, key in LAUNCH_KEYS:
        if isinstance(config.get(group), dict):
            config[group] = {k: v for k, v in config[group].items() if k != key}
    return config
