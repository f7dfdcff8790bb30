"""Generate text from a trained run: `python sample.py [ckpt=RUN_FOLDER] [prompt="..."] [key=value ...]`.

With no ckpt, samples from the newest run under out/. Configuration: configs/sample.yaml.
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from minillm import cli
from minillm.config import SampleJobConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
cli.register_schemas()


def run(cfg: SampleJobConfig) -> list[str]:
    """Print and return cfg.num_samples continuations of cfg.prompt."""
    import torch

    from minillm import ops
    from minillm.distributed import pick_device
    from minillm.generate import generate
    from minillm.run import load_run, newest_run

    device = pick_device(cfg.device)
    ops.configure(cfg.kernels, device)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    loaded = load_run(cfg.ckpt if cfg.ckpt is not None else newest_run(cfg.out_root), device, dtype)
    tok, model = loaded.tokenizer, loaded.model
    print(f"# {loaded.checkpoint} (step {loaded.step})", file=sys.stderr)
    prompt = "\n" if cfg.prompt is None else cfg.prompt
    ids = tok.encode(prompt)
    if len(ids) > model.cfg.block_size:
        print(f"# prompt is {len(ids)} tokens; keeping the last {model.cfg.block_size} (block_size)", file=sys.stderr)
        ids = ids[-model.cfg.block_size:]
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    stream = tok.stream() if cfg.stream else None
    if stream is not None:
        sys.stdout.write(("" if cfg.prompt is None else prompt))
        sys.stdout.flush()

    def on_token(col: "torch.Tensor") -> None:
        sys.stdout.write(stream.push(int(col[0])))
        sys.stdout.flush()

    out = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, gen,
                   kv_cache=cfg.kv_cache, on_token=on_token if stream is not None else None)
    texts = [("" if cfg.prompt is None else prompt) + tok.decode(row[len(ids):].tolist()) for row in out]
    for i, text in enumerate(texts):
        if i == 0 and stream is not None:
            sys.stdout.write(stream.flush() + "\n")
        else:
            sys.stdout.write(("\n" if i else "") + f"--- sample {i + 1}\n" + text + "\n")
    sys.stdout.flush()
    return texts


@hydra.main(version_base=None, config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    job = cli.to_dataclass(cfg, SampleJobConfig)
    cli.setup_logging()
    with cli.user_errors():
        run(job)


if __name__ == "__main__":
    cli.precheck(CONFIG_DIR, "sample", sys.argv[1:])
    main()
