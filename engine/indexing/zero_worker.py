"""A shard worker that is one rank of a ZeRO-3 group (placement.kind zero3).

The group's ranks hold the model partitioned (engine.model.zero3) and run their stages in lockstep: each call
gets a shard (or None: this rank has no shard this step) and the group's common batch count, and runs padding
batches up to it, so every rank makes the same collective all-gathers. engine.distributed.groups drives them.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import numpy as np

from engine.config import JobConfig
from engine.curvature.packing import pack_lambda
from engine.data.tokenize import TokenizedRow
from engine.errors import TributaryError
from engine.gradients.context import context_for_model
from engine.gradients.finite import nonfinite_rows_error
from engine.gradients.passes import batch_count, gradient_pass, lambda_pass
from engine.indexing.lambda_source import writes_fisher_rows
from engine.indexing.worker import ShardWorker
from engine.model.fingerprint import model_fingerprint, tokenizer_fingerprint
from engine.testing.faults import fault_point

JOIN_TIMEOUT_S = 120


class ZeroShardWorker(ShardWorker):
    def __init__(self, config: JobConfig, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.config = config
        self._rows = None
        self._range = None
        self._store = None
        self._factors = None
        self._scale = None
        self._facts: dict | None = None

    # ---- joining the group ----------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """This node's IP and a port free on it now: rank 0 offers them as the group's rendezvous."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, rank: int, world: int, address: str, port: int) -> dict:
        """Join the group's torch.distributed process group, load this rank's partition; the rank's facts."""
        import torch
        import torch.distributed as dist

        from engine.model.zero3 import full_bytes, load_zero3_model, partition_bytes

        gpu = torch.cuda.is_available()
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port))
        dist.init_process_group(
            "nccl" if gpu else "gloo",
            init_method=f"tcp://{address}:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=JOIN_TIMEOUT_S),
        )
        device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        model, tokenizer = load_zero3_model(self.config.model, self.config.placement, device)
        self.context = context_for_model(self.config, model, tokenizer, device)
        self._facts = {
            "spec": self.context.spec.to_dict(),
            "fingerprints": self._fingerprints(),
            "coverage": self.context.coverage.to_dict() if self.context.coverage is not None else {},
            "node": _node(),
            "pid": os.getpid(),
            "rank": rank,
            "partition_bytes": partition_bytes(model),
            "full_bytes": full_bytes(model),
        }
        return self._facts

    def _fingerprints(self) -> dict[str, str]:
        """The fingerprints the unsharded model has: its tracked weights gathered (collectively) to hash them."""
        import deepspeed

        context = self.context
        partitioned = [p for m in context.modules.values() for p in m.parameters(recurse=False) if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            model = model_fingerprint(context.model, context.modules)
        return {"model": model, "tokenizer": tokenizer_fingerprint(context.tokenizer)}

    def describe(self) -> dict:
        if self._facts is None:
            raise TributaryError("placement.kind zero3: describe() before the rank joined its group")
        return self._facts

    def batch_count(self, shards: list[int]) -> int:
        """The group's common batch count for these shards: the largest shard's."""
        ranges = self._open().shards()
        return max(batch_count(ranges[s][1] - ranges[s][0], self.config.data.batch_size) for s in shards)

    def query_gradients(self, rows: list[TokenizedRow], measurement: str) -> np.ndarray:
        """Projected gradients of `measurement` for query rows. Every rank of the group gets the same rows, so
        their batches and all-gathers line up; the driver keeps rank 0's."""
        return gradient_pass(self.context, rows, with_covariance=False, measurement=measurement).grads

    # ---- stages, in lockstep --------------------------------------------------------------------
    def _step_rows(self, shard: int | None) -> tuple[int, int, list[TokenizedRow]]:
        if shard is None:
            return 0, 0, []
        start, stop = self._open().shards()[shard]
        return start, stop, self._tokenized(start, stop)

    def gradients(self, shard: int | None, batches: int) -> dict | None:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Pass 1 of one shard (None: padding only), in `batches` batches; rows and covariance sums written."""
        started = time.perf_counter()
        store = self._open()
        start, stop, rows = self._step_rows(shard)
        fisher_rows = writes_fisher_rows(self.config) and store.has_fisher_rows()
        result = gradient_pass(self.context, rows, start, pad_batches=batches, fisher_rows=fisher_rows)
        if shard is None:
            return None
        ids = self._ids(start, stop)
        if result.nonfinite:  # data.on_nonfinite skip is refused with zero3 (it would break lockstep)
            raise nonfinite_rows_error(result.nonfinite, ids, start, self.config.data.train)
        checksum, arrays = self._write_pass_one(store, shard, start, ids, result)
        return self._receipt("gradients", shard, started, checksum, arrays)

    def lambdas(self, shard: int | None, batches: int) -> dict | None:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Λ sums of one shard (None: padding only), written: from a read of the store where it holds the rows Λ
        needs (no collectives then, so no lockstep), else pass 2 in `batches` batches."""
        started = time.perf_counter()
        store = self._open()
        if self._factors is None:
            self._factors = store.read_factors()
        if self._stored_rows(store) is not None:
            if shard is None:
                return None
            start, stop = store.shards()[shard]
            packed = self._lambda_sums(store, start, stop, self._factors, None)
        else:
            start, stop, rows = self._step_rows(shard)
            check = self._row_check(self._ids(start, stop), start, list(range(len(rows))))
            sums = lambda_pass(self.context, rows, self._factors, None, on_nonfinite=check, pad_batches=batches)
            if shard is None:
                return None
            packed = pack_lambda(sums.lambdas, self.context.spec)
        self._check_sums("lambda", shard, packed[0], self._lambda_widths())
        fault_point("actor", "lambdas", shard)
        store.write_partial("lambda", shard, *packed)
        return self._receipt("lambdas", shard, started)


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
