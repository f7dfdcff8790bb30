"""Generate text from a trained run: `python sample.py [ckpt=RUN_FOLDER] [prompt="..."] [key=value ...]`.

With no ckpt, samples from the newest run under out/. Prompts come from `prompt=`, from
`prompt_file=` (prompts separated by blank lines, sampled `batch_size` rows at a time) or, with
`interactive=true`, from stdin (one per line, until EOF; each line draws fresh seeds, see interact).
Configuration: configs/sample.yaml.
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from minillm import cli
from minillm.config import ConfigError, SampleJobConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
cli.register_schemas()


def read_prompts(cfg: SampleJobConfig) -> list:
    """The prompts of a non-interactive run; None stands for "start a fresh document"."""
    if cfg.prompt_file is None:
        return [cfg.prompt]
    path = Path(cfg.prompt_file).expanduser()
    if not path.is_file():
        what = "not a regular file (a device, pipe or folder)" if path.exists() else "no such file"
        raise ConfigError(f"prompt_file={cfg.prompt_file!r}: {what}; give a UTF-8 text file of prompts")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"prompt_file={cfg.prompt_file!r}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    blocks = [b.strip("\n") for b in text.replace("\r\n", "\n").split("\n\n")]
    prompts = [b for b in blocks if b.strip()]
    if not prompts:
        raise ConfigError(f"prompt_file={cfg.prompt_file!r}: holds no prompt (the file is empty or blank)")
    return prompts


def complete(loaded, cfg: SampleJobConfig, prompts: list) -> list[str]:
    """Sample cfg.num_samples continuations of each prompt, cfg.batch_size rows (prompt x sample) per
    batch; print them (streaming the first) as each batch ends and return prompt + continuation for
    every row. A row's text depends on its prompt and seed only, not on how rows are batched."""
    from minillm.generation import Engine, SamplingParams, sample_rows
    from minillm.tokenizer import UNK_ID

    tok, block_size = loaded.tokenizer, loaded.model.cfg.block_size
    shown = ["" if p is None else p for p in prompts]
    for i, p in enumerate(shown):
        ids = tok.encode(p)
        if len(ids) > block_size:
            print(f"# prompt {i + 1} is {len(ids)} tokens; keeping the last {block_size} (block_size)", file=sys.stderr)
        if UNK_ID in ids:  # a vocabulary without byte fallback (a char model) lacks some of its characters
            missing = sorted({c for c in p if UNK_ID in tok.encode(c)})
            print(f"# prompt {i + 1}: {len(missing)} character(s) not in the model's vocabulary "
                  f"({', '.join(map(repr, missing[:5]))}) reach it as <unk>", file=sys.stderr)
    engine = Engine(loaded.model, tok)
    params = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)
    stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in cfg.stop]
    rows = sample_rows(["\n" if p is None else p for p in prompts], cfg.seed, cfg.num_samples)
    n_batches, texts = -(-len(rows) // cfg.batch_size), []
    for k, start in enumerate(range(0, len(rows), cfg.batch_size)):
        batch = rows[start:start + cfg.batch_size]
        if n_batches > 1:
            notice(f"# batch {k + 1}/{n_batches}: rows {start + 1}-{start + len(batch)} of {len(rows)}")
        if cfg.stream and start == 0:  # row 0 streams: its header and prompt now, after its batch's notice
            sys.stdout.write(header(cfg, len(prompts), 0) + shown[0])
            sys.stdout.flush()
        outs = [""] * len(batch)
        for event in engine.generate(batch, cfg.max_new_tokens, params, stop, cfg.kv_cache):
            outs[event.row] += event.text
            if cfg.stream and start + event.row == 0 and event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        for r, out in enumerate(outs, start):
            texts.append(shown[r // cfg.num_samples] + out)
            print_sample(cfg, len(prompts), r, texts[-1], last=r == len(rows) - 1)
        sys.stdout.flush()
    return texts


def notice(line: str) -> None:
    """A line on stderr, after flushing stdout: on a terminal showing both, it lands between the lines
    printed before and after it rather than inside one."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


def header(cfg: SampleJobConfig, n_prompts: int, r: int) -> str:
    """Row r's label line when there are several rows ("--- sample 2", "--- prompt 1, sample 2"); none
    for a lone sample, so that its stdout is just the text. Streamed or not, the same."""
    if n_prompts * cfg.num_samples == 1:
        return ""
    i, j = divmod(r, cfg.num_samples)
    return "--- " + (f"sample {j + 1}" if n_prompts == 1 else f"prompt {i + 1}, sample {j + 1}") + "\n"


def print_sample(cfg: SampleJobConfig, n_prompts: int, r: int, text: str, last: bool) -> None:
    """Write row r's text under its header, then a blank line unless it is the last row (so that a batch
    notice on stderr lands just above the next header). Row 0, when streamed, is on stdout already."""
    end = "\n" if last else "\n\n"
    sys.stdout.write(end if r == 0 and cfg.stream else header(cfg, n_prompts, r) + text + end)


def run(cfg: SampleJobConfig) -> list[str]:
    """Print and return the samples the config asks for (every prompt x num_samples)."""
    import torch

    from minillm import ops
    from minillm.device import pick_device
    from minillm.run_folder import load_run, newest_run

    prompts = None if cfg.interactive else read_prompts(cfg)
    device = pick_device(cfg.device)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    loaded = load_run(cfg.ckpt if cfg.ckpt is not None else newest_run(cfg.out_root), device, dtype)
    ops.configure(cfg.kernels, device)
    print(f"# {loaded.checkpoint} (step {loaded.step})", file=sys.stderr)
    if prompts is not None:
        return complete(loaded, cfg, prompts)
    return interact(loaded, cfg)


def interact(loaded, cfg: SampleJobConfig) -> list[str]:
    """Sample each stdin line (until EOF) as a prompt. Prompt n (from 0; empty lines are skipped)
    draws from seed s = cfg.seed + n * num_samples (sample j from s + j, as `prompt=LINE seed=s` would),
    so every prompt gets fresh randomness and the same lines and seed give the same session again.
    Its seed is noted on stderr."""
    import dataclasses

    texts, n = [], 0
    for line in iter(_read_line, None):
        if not line.strip():
            print("# empty prompt skipped; type some text (EOF ends)", file=sys.stderr)
            continue
        seed = (cfg.seed + n * cfg.num_samples) % 2**32
        print(f"# prompt {n + 1}: seed={seed}", file=sys.stderr)
        texts += complete(loaded, dataclasses.replace(cfg, seed=seed), [line])
        n += 1
    return texts


def _read_line():
    """The next stdin line without its newline; None at EOF. Shows '> ' when a person is typing."""
    if sys.stdin.isatty():
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


@hydra.main(version_base=None, config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    job = cli.to_dataclass(cfg, SampleJobConfig)
    cli.setup_logging()
    with cli.user_errors():
        try:
            run(job)
        except KeyboardInterrupt:  # Ctrl-C: what was generated is printed; no traceback
            print("\n# stopped by SIGINT", file=sys.stderr, flush=True)
            sys.exit(130)


if __name__ == "__main__":
    sys.argv[1:] = cli.literal_strings(sys.argv[1:], SampleJobConfig)  # prompts, paths: exactly as the shell gave them
    cli.precheck(CONFIG_DIR, "sample", sys.argv[1:])
    main()
