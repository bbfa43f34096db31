"""vLLM in `benchmarks.serve` (`--vllm VENV/bin/python`): how it is started, and what its log says.

vLLM (0.32's CPU build, made by `bash benchmarks/peers/vllm.sh`) serves the benchmark's own folder
(its weights carry the hub's `vision_tower.vision_model.` keys, which vLLM needs: `build_folder`
writes them with `mmchat.convert.to_llava_hf.hub_layout`) in float32, twice: as it starts by default,
and with `--block-size 32` (its better setting on this CPU, per issue 26). Nothing else is tuned:
its default context (the folder's 4,096 positions), scheduler and prefix caching. On the CPU:

- `VLLM_TARGET_DEVICE=cpu` names the platform;
- `VLLM_CPU_KVCACHE_SPACE` (GiB, `KV_CACHE_GIB`) sizes its KV cache, which it otherwise sizes from free
  memory; 1 GiB is 65k positions of this model (16 users × ~900 positions need 15k);
- threads: vLLM binds its model process's OpenMP threads itself (`VLLM_CPU_OMP_THREADS_BIND=auto`,
  the default: one thread per physical core, less one core reserved for the API process) and ignores
  `torch.set_num_threads`; on 2 cores that is one model thread, as `--threads 1` gives the other
  servers. The binding it chose is read from its log into the run's notes (`thread_note`).
"""
from __future__ import annotations

import re
from pathlib import Path

VLLM_SERVERS = {"vllm": ("vLLM", []), "vllm-bs32": ("vLLM --block-size 32", ["--block-size", "32"])}
"""key -> (label, extra `vllm serve` flags)."""
KV_CACHE_GIB = 1


def vllm_cli(python: Path) -> Path:
    """The `vllm` command beside the venv's python; a missing one names the script that makes it."""
    cli = Path(python).absolute().with_name("vllm")  # not resolve(): the venv's python links out of it
    if not cli.is_file():
        raise SystemExit(f"--vllm {python}: no `vllm` command beside it; make the venv with "
                         "`bash benchmarks/peers/vllm.sh` and pass VENV/bin/python")
    return cli


def vllm_command(key: str, python: Path, folder: Path, port: int, seed: int) -> list[str]:
    return [str(vllm_cli(python)), "serve", str(folder), "--dtype", "float32", "--host", "127.0.0.1",
            "--port", str(port), "--seed", str(seed), *VLLM_SERVERS[key][1]]


def vllm_env() -> dict[str, str]:
    return {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}


def thread_note(log: str) -> list[str]:
    """vLLM's OpenMP binding as its log reports it (`local_rank=0, core ids=[1]`)."""
    found = re.search(r"local_rank=0, core ids=\[([^\]]*)\]", log)
    if not found:
        return []
    cores = [c for c in found.group(1).replace(" ", "").split(",") if c]
    return [f"model process bound to core(s) {', '.join(cores)} ({len(cores)} OpenMP thread"
            f"{'s' * (len(cores) != 1)}, VLLM_CPU_OMP_THREADS_BIND=auto), KV cache "
            f"VLLM_CPU_KVCACHE_SPACE={KV_CACHE_GIB} GiB"]
