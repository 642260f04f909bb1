"""Data-parallel training and sharded evaluation (vsl.distributed).

The acceptance checks launch 2 Gloo processes on CPU (loopback only) and compare them with one
process holding the whole batch: gradients after one step within 1e-5, the losses of 3 Adam steps,
the BatchNorm running statistics, and sharded evaluation bit for bit.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from vsl import distributed as vdist
from vsl.config import Config
from vsl.errors import ConfigError
from vsl.evaluation import image_shard, sharded_similarity
from vsl.losses import VSLObjective
from vsl.models import build_model

WORLD = 2
BATCH = 8            # global batch: 4 samples per rank
STEPS = 3
VOCAB = 30
REGIONS = 5


def tiny_config(module_name: str) -> Config:
    return Config(module_name=module_name, img_dim=12, word_dim=8, embed_size=16, sim_dim=8, sgr_step=2,
                  vocab_size=VOCAB, num_regions=REGIONS, batch_size=BATCH)


def tiny_model(module_name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(tiny_config(module_name)).train()
    # Dropout masks are drawn per process, so the equivalence test switches dropout off; BatchNorm
    # stays in training mode (batch statistics and running-statistic updates are under test).
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def global_batch(step: int):
    """Step ``step``'s global batch: images (B, R, D), captions (B, L), lengths (B,), semantic (B, B)."""
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randn(BATCH, REGIONS, 12, generator=g)
    lengths = torch.randint(3, 9, (BATCH,), generator=g)
    captions = torch.randint(4, VOCAB, (BATCH, 8), generator=g)
    captions = captions * (torch.arange(8) < lengths[:, None])
    semantic = torch.rand(BATCH, BATCH, generator=g)
    semantic = (semantic + semantic.t()) / 2
    semantic.fill_diagonal_(1.0)
    return images, captions, lengths, semantic


def local_slice(tensors, rank: int, world: int):
    """Rank ``rank``'s contiguous slice of each per-sample tensor (as EpochSampler shards)."""
    per = BATCH // world
    return [t[rank * per:(rank + 1) * per] for t in tensors]


def train_steps(scorer: nn.Module, model: nn.Module, rank: int, world: int):
    """Run STEPS Adam steps; return (first-step grads, losses, final params, final buffers,
    first-step buffers)."""
    objective = VSLObjective(vsl_weight=10.0, temperature=0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses, first_grads, first_buffers = [], None, None
    for step in range(STEPS):
        images, captions, lengths, semantic = global_batch(step)
        if world > 1:
            images, captions, lengths = local_slice((images, captions, lengths), rank, world)
            captions = captions[:, :int(lengths.max())]        # each rank pads to its own longest caption
        optimizer.zero_grad()
        scores = scorer(images, captions, lengths)
        loss = objective(scores, semantic)["loss"]
        loss.backward()
        if first_grads is None:
            first_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            first_buffers = {k: b.clone() for k, b in model.named_buffers()}
        optimizer.step()
        losses.append(loss.item())
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return first_grads, losses, params, buffers, first_buffers


def uneven_step(scorer: nn.Module, model: nn.Module, rows: slice):
    """Gradients of one step on the first 7 samples of batch 5, this process holding ``rows``."""
    images, captions, lengths, semantic = (t[:7] for t in global_batch(5))
    semantic = semantic[:, :7]
    scores = scorer(images[rows], captions[rows], lengths[rows])
    VSLObjective(vsl_weight=10.0, temperature=0.01)(scores, semantic)["loss"].backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def eval_inputs():
    g = torch.Generator().manual_seed(7)
    n, m = 11, 9
    img_emb = nn.functional.normalize(torch.randn(n, REGIONS, 16, generator=g), dim=-1)
    lengths = torch.randint(2, 7, (m,), generator=g)
    cap_emb = nn.functional.normalize(torch.randn(m, 6, 16, generator=g), dim=-1)
    cap_emb = cap_emb * (torch.arange(6) < lengths[:, None]).unsqueeze(-1)
    return img_emb, cap_emb, lengths


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = vdist.setup_distributed("cpu", timeout_s=60)      # a mismatched collective fails, not hangs
    try:
        assert (info.rank, info.world_size, info.backend, info.is_main) == (rank, world, "gloo", rank == 0)
        # A single-process scorer stays local inside a process group (group=None = no communication).
        model = tiny_model("SGR")
        images, captions, lengths, _ = global_batch(0)
        local = vdist.wrap_model(model, vdist.DistInfo())(images, captions, lengths)
        assert local.shape == (BATCH, BATCH)
        result = {}
        for name in ("SGR", "SAF"):
            model = tiny_model(name)
            if rank == 1:        # different local init: DDP must broadcast rank 0's weights
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)
            scorer = vdist.wrap_model(model, info)
            assert isinstance(scorer, nn.parallel.DistributedDataParallel)
            assert vdist.unwrap_model(scorer) is model
            result[name] = train_steps(scorer, model, rank, world)
        # Uneven local batches (the last batch of an epoch): 4 + 3 samples.
        model = tiny_model("SAF")
        result["uneven"] = uneven_step(vdist.wrap_model(model, info), model, slice(0, 4) if rank == 0 else slice(4, 7))
        # Sharded evaluation: 11 images in blocks of 3 -> 4 blocks, uneven shards (6 + 5 rows).
        model = tiny_model("SAF").eval()
        img_emb, cap_emb, lengths = eval_inputs()
        result["eval"] = sharded_similarity(model, img_emb, cap_emb, lengths, block_images=3,
                                                  group=info.group)
        # Caption ids of the global batch (for the semantic matrices), uneven local sizes.
        ids = torch.arange(10 * rank, 10 * rank + 2 + rank)
        result["ids"] = vdist.all_gather_concat(ids, info.group)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        vdist.cleanup()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Results of the 2-process Gloo run, loaded per rank."""
    out = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(_worker, args=(WORLD, vdist.free_loopback_port(), str(out)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=1):          # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process run did not finish within 240 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process():
    """The same steps in this process with the whole batch (1 thread, like each rank)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = {}
        for name in ("SGR", "SAF"):
            model = tiny_model(name)
            result[name] = train_steps(vdist.wrap_model(model, vdist.DistInfo()), model, 0, 1)
        model = tiny_model("SAF")
        result["uneven"] = uneven_step(vdist.wrap_model(model, vdist.DistInfo()), model, slice(0, 7))
        model = tiny_model("SAF").eval()
        result["eval"] = sharded_similarity(model, *eval_inputs(), block_images=3)
        result["eval_plain"] = model.similarity(*eval_inputs())
        return result
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["SGR", "SAF"])
def test_first_step_gradients_equal_single_process(two_ranks, single_process, name):
    ref_grads = single_process[name][0]
    for rank in range(WORLD):
        grads = two_ranks[rank][name][0]
        assert grads.keys() == ref_grads.keys()
        for key, ref in ref_grads.items():
            assert ref.abs().max() > 0 or key.endswith("bias"), key
            # Two ranks sum the batch's gradient in another order than one process: float32 rounding of
            # order 1e-5 relative to the entry (on this machine's CPU: 1.1e-5 on an entry of 0.48).
            torch.testing.assert_close(grads[key], ref, atol=1e-5, rtol=5e-5, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.slow
def test_uneven_local_batches_give_the_global_batch_gradient(two_ranks, single_process):
    for rank in range(WORLD):
        for key, ref in single_process["uneven"].items():
            torch.testing.assert_close(two_ranks[rank]["uneven"][key], ref, atol=1e-5, rtol=0, msg=key)


@pytest.mark.slow
def test_sgr_key_bias_gradient_is_exact_zero(two_ranks, single_process):
    # graph_key_w.bias cancels in the edge softmax: a zero gradient (not None, which DDP would refuse).
    key = "sim_enc.SGR_module.0.graph_key_w.bias"
    for grads in (single_process["SGR"][0], two_ranks[0]["SGR"][0], two_ranks[1]["SGR"][0]):
        assert torch.count_nonzero(grads[key]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SGR", "SAF"])
def test_three_step_losses_and_weights_match(two_ranks, single_process, name):
    ref_grads, ref_losses, ref_params, *_ = single_process[name]
    # Biases followed by a BatchNorm or a softmax have a zero gradient in exact arithmetic; Adam
    # scales their rounding noise (~1e-8) up to full-size steps, in one process as in two. Their
    # weights are not comparable, every other parameter is.
    noise_only = {k for k, g in ref_grads.items() if g.abs().max() < 1e-6}
    assert noise_only <= {k for k in ref_grads if k.endswith("bias")}
    for rank in range(WORLD):
        _, losses, params, *_ = two_ranks[rank][name]
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)
        for key, ref in ref_params.items():
            if key not in noise_only:
                torch.testing.assert_close(params[key], ref, atol=1e-5, rtol=0,
                                           msg=lambda m: f"{name} {key}: {m}")
    # The ranks stay in lock-step exactly (same summed gradients, same optimizer).
    for key, value in two_ranks[0][name][2].items():
        assert torch.equal(value, two_ranks[1][name][2][key]), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SGR", "SAF"])
def test_batchnorm_running_statistics_are_global(two_ranks, single_process, name):
    # After 3 steps: identical on every rank by construction (no DDP buffer broadcast needed).
    final0, final1 = two_ranks[0][name][3], two_ranks[1][name][3]
    for key in final0:
        assert torch.equal(final0[key], final1[key]), key
    # After the first step (same weights everywhere; later the noise-driven biases feeding the
    # BatchNorms differ, see above): the single-process statistics of the global batch.
    ref_buffers = single_process[name][4]
    for rank in range(WORLD):
        for key, ref in ref_buffers.items():
            got = two_ranks[rank][name][4][key]
            torch.testing.assert_close(got.double(), ref.double(), atol=1e-6, rtol=1e-6, msg=key)
    if name == "SAF":
        # One SAF update per caption of the global batch (not per local caption).
        assert int(final0["sim_enc.SAF_module.bn.num_batches_tracked"]) == STEPS * BATCH


@pytest.mark.slow
def test_sharded_eval_equals_single_process_exactly(two_ranks, single_process):
    ref = single_process["eval"]
    assert ref.shape == (11, 9)
    for rank in range(WORLD):
        assert torch.equal(two_ranks[rank]["eval"], ref)
    # Same numbers as scoring everything at once, up to float rounding of a different chunking.
    torch.testing.assert_close(ref, single_process["eval_plain"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_all_gather_concat_uneven_sizes(two_ranks):
    expected = torch.tensor([0, 1, 10, 11, 12])
    for rank in range(WORLD):
        assert torch.equal(two_ranks[rank]["ids"], expected)


# ----------------------------------------------------------------------------------------------
# Single-process behaviour (no process group)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,world,block", [(11, 2, 3), (1000, 3, 128), (5, 4, 2), (0, 2, 4), (7, 1, 128)])
def test_image_shards_partition_the_images(n, world, block):
    shards = [image_shard(n, r, world, block) for r in range(world)]
    covered = [i for start, stop in shards for i in range(start, stop)]
    assert covered == list(range(n))                     # contiguous, disjoint, in rank order
    for start, stop in shards:
        assert start % block == 0 or start == n          # whole blocks only
    sizes = [stop - start for start, stop in shards]
    assert max(sizes) - min(sizes) <= block


def test_single_process_scorer_is_the_model():
    model = tiny_model("SGR")
    images, captions, lengths, _ = global_batch(0)
    scorer = vdist.wrap_model(model, vdist.DistInfo())
    assert not isinstance(scorer, nn.parallel.DistributedDataParallel)
    assert vdist.unwrap_model(scorer) is model
    torch.manual_seed(1)
    a = scorer(images, captions, lengths)
    torch.manual_seed(1)
    b = model(images, captions, lengths)
    assert a.shape == (BATCH, BATCH) and torch.equal(a, b)


def test_setup_without_torchrun_is_single_process(monkeypatch):
    for name in vdist.process.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    info = vdist.setup_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.is_distributed) == (0, 1, True, False)
    assert info.device == torch.device("cpu") and info.group is None
    assert vdist.all_gather_concat(torch.arange(3)).tolist() == [0, 1, 2]


def test_incomplete_torchrun_environment_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR.*torchrun") as err:
        vdist.setup_distributed("cpu")
    assert "\n" not in str(err.value)


def test_sharded_similarity_refuses_training_mode():
    model = tiny_model("SAF")
    with pytest.raises(ValueError, match="eval"):
        sharded_similarity(model, *eval_inputs())


# ----------------------------------------------------------------------------------------------
# End to end: `torchrun --nproc_per_node 2 -m vsl train / eval` (Gloo on CPU, loopback rendezvous)
# ----------------------------------------------------------------------------------------------
TORCHRUN_TRAIN_IMAGES, TORCHRUN_BATCH = 41, 8
TORCHRUN_STEPS = TORCHRUN_TRAIN_IMAGES * 5 // TORCHRUN_BATCH + 1  # 26 per epoch: the last holds 5 = 3 + 2


def torchrun(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m vsl ARGS`` on CPU; fails the test on error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in vdist.process.TORCHRUN_ENV:                 # a clean launch, whatever the test runner's env
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "vsl", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def torchrun_dataset(tmp_path_factory):
    from conftest import write_scan_dataset
    return write_scan_dataset(tmp_path_factory.mktemp("scan"), "easy_precomp",
                              {"train": TORCHRUN_TRAIN_IMAGES, "dev": 10, "test": 12})


def torchrun_train_flags(data: dict, out: Path) -> list:
    return ["--data_path", data["data_path"], "--vocab_path", data["vocab_path"], "--data_name", data["data_name"],
            "--batch_size", str(TORCHRUN_BATCH), "--num_epochs", "2", "--learning_rate", "0.004",
            "--module_name", "SAF", "--img_dim", "16", "--num_regions", "16", "--word_dim", "16",
            "--embed_size", "32", "--sim_dim", "16", "--workers", "0", "--log_step", "5", "--val_step", "0",
            "--textual_semantic_loss",        # both global semantic matrices (image and caption)
            "--seed", "1", "--device", "cpu", "--quiet",
            "--model_name", str(out / "ckpt"), "--logger_name", str(out / "log")]


@pytest.fixture(scope="module")
def torchrun_run(torchrun_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun_a")
    done = torchrun("train", *torchrun_train_flags(torchrun_dataset, out))
    return out, done


@pytest.mark.slow
def test_torchrun_train_writes_once_from_rank_0(torchrun_run):
    from vsl.checkpoint import read_checkpoint
    from vsl.logs import read_metrics

    out, done = torchrun_run
    assert done.stdout.count("done: 2 epochs") == 1                      # only rank 0 reports
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [
        "checkpoint_1.pth.tar", "checkpoint_2.pth.tar", "checkpoint_last.pth.tar", "model_best.pth.tar"]
    ckpt = read_checkpoint(out / "ckpt" / "checkpoint_2.pth.tar")
    # Iterations count global batches: 2 processes x 4 samples = one step of batch 8.
    assert (ckpt["epoch"], ckpt["iteration"]) == (2, 2 * TORCHRUN_STEPS)
    assert ckpt["extra"]["world_size"] == WORLD and len(ckpt["extra"]["rng_ranks"]) == WORLD
    records = read_metrics(out / "log")
    assert all(r["tsl"] > 0 and r["vsl"] > 0 for r in records if r["split"] == "train")
    steps = [r["step"] for r in records if r["split"] == "train"]
    # One writer, no duplicates: every 5th iteration and each epoch's last.
    assert steps == sorted({*range(5, 2 * TORCHRUN_STEPS + 1, 5), TORCHRUN_STEPS, 2 * TORCHRUN_STEPS})
    assert [r["step"] for r in records if r["split"] == "val"] == [TORCHRUN_STEPS, 2 * TORCHRUN_STEPS]


@pytest.mark.slow
def test_torchrun_resume_with_same_world_size_is_exact(torchrun_run, tmp_path):
    from vsl.checkpoint import read_checkpoint

    out, _ = torchrun_run
    torchrun("train", "--resume", str(out / "ckpt" / "checkpoint_1.pth.tar"), "--quiet",
             "--model_name", str(tmp_path / "ckpt"), "--logger_name", str(tmp_path / "log"))
    expected = read_checkpoint(out / "ckpt" / "checkpoint_2.pth.tar")
    resumed = read_checkpoint(tmp_path / "ckpt" / "checkpoint_2.pth.tar")
    for a, b in zip(resumed["model"], expected["model"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["best_rsum"] == expected["best_rsum"]


@pytest.mark.slow
def test_torchrun_eval_equals_single_process_eval_exactly(torchrun_run, torchrun_dataset, tmp_path):
    import json

    import numpy as np

    from vsl.cli import main

    out, _ = torchrun_run
    args = ["eval", "--checkpoint", str(out / "ckpt" / "checkpoint_2.pth.tar"), "--data_path",
            torchrun_dataset["data_path"], "--split", "test", "--device", "cpu", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                       # as in each torchrun process (OMP_NUM_THREADS=1)
    try:
        assert main([*args, "--output", str(tmp_path / "one.json"), "--save_sims", str(tmp_path / "one.npy")]) == 0
    finally:
        torch.set_num_threads(threads)
    done = torchrun(*args, "--output", str(tmp_path / "two.json"), "--save_sims", str(tmp_path / "two.npy"))
    assert done.stdout.count("rsum") == 1                                # only rank 0 prints the table
    one, two = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert one.shape == (12, 60) and np.array_equal(one, two)
    assert json.loads((tmp_path / "one.json").read_text()) == json.loads((tmp_path / "two.json").read_text())
