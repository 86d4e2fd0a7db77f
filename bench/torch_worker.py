"""PyTorch's reference train step, timed in a process of its own.

`TorchProcess` (used by train_step.py) starts `python -m bench.torch_worker` and talks to it
over its stdin / stdout, one JSON object per line:

    parent -> {"sizes": BenchSizes fields, "keep_host_buffers": bool}
    worker -> {"threads": ..., "version": ...}          (model built, one step taken)
    parent -> {"run": true}                             (one timed repeat, `iters` steps)
    worker -> {"s": seconds per step}
    parent closes stdin -> the worker exits

Why a process: in one process PyTorch and XLA share glibc's heap and the cores' thread pools,
and each slowed the other. Measured on a 2-core AMD EPYC (AVX2), `python -m bench
--sections=train --repeats=5`, PyTorch in the same process: our step 2228 ms interleaved with
PyTorch's against 1761 ms with `--no_torch`; with OMP_WAIT_POLICY=PASSIVE ours 1970 ms and
PyTorch's 1745 ms instead of 1510. A user runs one framework per process, so each is timed
in its own. The parent's heap setting (`--no_keep_host_buffers`) is passed on, so both run
under the same allocator settings.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Any

from bench.sizes import BenchSizes, model_config, synthetic_batch
from bench.timing import timed


class TorchStep:
    """HF PyTorch BartForConditionalGeneration + AdamW (+ grad clip), dropout on."""

    def __init__(self, cfg, batch: dict, iters: int) -> None:
        import torch
        from transformers import BartConfig, BartForConditionalGeneration

        torch.manual_seed(0)
        hf_cfg = BartConfig(
            **{
                f.name: getattr(cfg, f.name)
                for f in dataclasses.fields(cfg)
                if f.name not in ("dtype", "remat")
            }
        )
        self.model = BartForConditionalGeneration(hf_cfg).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        self.batch = {k: torch.from_numpy(v.astype("int64")) for k, v in batch.items()}
        self.iters = iters
        self.threads = torch.get_num_threads()
        self.torch_version = torch.__version__
        self._one()

    def _one(self) -> None:
        import torch

        out = self.model(
            input_ids=self.batch["input_ids"],
            decoder_input_ids=self.batch["decoder_input_ids"],
            labels=self.batch["labels"],
        )
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()

    def run(self) -> float:
        return timed(self._one, self.iters)


class TorchProcess:
    """The worker process for `sz`'s config and synthetic batch; `run()` -> seconds per step."""

    def __init__(self, sz: BenchSizes, keep_host_buffers: bool) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.torch_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self._ask({"sizes": dataclasses.asdict(sz), "keep_host_buffers": keep_host_buffers})
        self.threads, self.torch_version = ready["threads"], ready["version"]

    def _ask(self, message: dict) -> dict:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise RuntimeError(f"bench.torch_worker exited (status {code}) without an answer")
        return json.loads(line)

    def run(self) -> float:
        return float(self._ask({"run": True})["s"])

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait()


def _sizes(fields: dict[str, Any]) -> BenchSizes:
    """BenchSizes from its JSON fields (JSON turned its tuples into lists)."""
    return BenchSizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def main() -> int:
    from meta_mask.training import host_heap

    setup = json.loads(sys.stdin.readline())
    sz = _sizes(setup["sizes"])
    if setup["keep_host_buffers"]:
        host_heap.keep_freed_buffers()
    cfg = model_config(sz)
    step = TorchStep(cfg, synthetic_batch(cfg, sz.batch, sz.seq, sz.seq), sz.iters)
    print(json.dumps({"threads": step.threads, "version": step.torch_version}), flush=True)
    for line in sys.stdin:
        if json.loads(line).get("run"):
            print(json.dumps({"s": step.run()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
