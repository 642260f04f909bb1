"""vsl ablate: the statistics against hand-computed cases, command lines, skip/resume, bad input."""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vsl.ablate import report, stats
from vsl.ablate.run import prepare, run_study
from vsl.ablate.runner import Executor, Run, Slots, train_flags
from vsl.ablate.studies import STUDIES, get_study
from vsl.cli import build_parser, main, train_config
from vsl.config import Config
from vsl.errors import ConfigError


# --- statistics ---------------------------------------------------------------------------------
def test_mean_ci_is_the_student_t_interval():
    # mean 2, sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051 = 2.484138.
    ci = stats.mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["sd"] == 1.0 and ci["n"] == 3
    assert ci["ci95"] == pytest.approx([2 - 2.484138, 2 + 2.484138], abs=1e-6)
    # n = 2 (10, 14): mean 12, sd 2.828427, t(0.975, 1) = 12.706205 -> half 25.412409.
    assert stats.mean_ci([10, 14])["ci95"] == pytest.approx([12 - 25.412409, 12 + 25.412409], abs=1e-5)
    assert stats.mean_ci([5.0]) == {"mean": 5.0, "ci95": None, "sd": None, "n": 1}
    assert stats.mean_ci([])["n"] == 0


def test_query_contributions_by_hand():
    # 2 images, 2 captions each. Image 0: best own caption at rank 0; image 1: at rank 6.
    # Captions of image 0: ranks 0, 3; of image 1: ranks 1, 12.
    c = stats.query_contributions(np.array([0, 6]), np.array([0, 3, 1, 12]))
    assert c["i2t_r1"].tolist() == [100, 0] and c["i2t_r5"].tolist() == [100, 0]
    assert c["i2t_r10"].tolist() == [100, 100]
    assert c["t2i_r1"].tolist() == [50, 0] and c["t2i_r5"].tolist() == [100, 50]
    assert c["t2i_r10"].tolist() == [100, 50]
    assert c["rsum"].tolist() == [550, 200]
    with pytest.raises(Exception, match="per-query ranks"):
        stats.query_contributions(np.array([0, 1]), np.array([0, 1, 2]))


def test_query_contributions_reproduce_the_published_metrics():
    from vsl import metrics

    sims = np.random.default_rng(0).standard_normal((40, 200)).astype(np.float32)
    sims[np.arange(40), 5 * np.arange(40)] += 2.0                    # some signal
    expected = metrics.retrieval_metrics(sims)
    c = stats.query_contributions(metrics.i2t(sims)[1][0], metrics.t2i(sims)[1][0])
    flat = stats.flat_metrics(expected)
    for name in stats.METRICS:
        assert c[name].mean() == pytest.approx(flat[name], abs=1e-9), name


def _contrib(rsum_per_image):
    rsum = np.asarray(rsum_per_image, np.float64)
    return {m: rsum / 7 for m in stats.METRICS[:-1]} | {"rsum": rsum}


def test_paired_bootstrap_hand_computable_cases():
    rng = np.random.default_rng(1)
    base = _contrib(rng.uniform(0, 600, 300))             # widely varying per-query results
    # The arm is the baseline + 6 on every query: the paired difference is exactly 6, no spread.
    shifted = {m: v + 6 / 7 if m != "rsum" else v + 6 for m, v in base.items()}
    out = stats.paired_bootstrap([shifted], [base])
    assert out["rsum"]["diff"] == pytest.approx(6) and out["rsum"]["ci95"] == pytest.approx([6, 6])
    # Identical runs: difference 0, interval [0, 0].
    assert stats.paired_bootstrap([base], [base])["rsum"] == {"diff": 0.0, "ci95": [0.0, 0.0], "seeds": 1}
    # Two seeds, differences +2 and 0 on every query: the mean over seeds, +1.
    plus2 = {m: v + 2 for m, v in base.items()}
    assert stats.paired_bootstrap([plus2, base], [base, base])["i2t_r1"]["diff"] == pytest.approx(1)


def test_paired_bootstrap_interval_matches_the_normal_approximation():
    # Per-query differences of 0 or 100 (half each, 400 queries): mean 50, standard error
    # 50 / sqrt(400) = 2.5, so the 95% interval is about 50 -+ 1.96 * 2.5 = [45.1, 54.9].
    d = np.repeat([0.0, 100.0], 200)
    zero = _contrib(np.zeros(400))
    out = stats.paired_bootstrap([_contrib(d)], [zero])["rsum"]
    assert out["diff"] == pytest.approx(50)
    assert out["ci95"][0] == pytest.approx(45.1, abs=0.7) and out["ci95"][1] == pytest.approx(54.9, abs=0.7)
    assert stats.ci_excludes_zero(out["ci95"]) and not stats.ci_excludes_zero([-1, 2])


# --- command lines --------------------------------------------------------------------------------
def test_train_flags_round_trip_through_vsl_train():
    values = dict(data_path="/d", data_name="x_precomp", vocab_path="/v", module_name="SAF", img_dim=16,
                  batch_size=32, learning_rate=4e-3, max_violation=False, bi_gru=False, textual_semantic_loss=True,
                  vsl_weight=0.0, vsl_rank="per-image", semantic="cider", workers=0, seed=3, warmup_iters=50)
    flags = train_flags(values)
    assert "--no_max_violation" in flags and "--no_bi_gru" in flags and "--textual_semantic_loss" in flags
    args = build_parser().parse_args(["train", *flags])
    got = train_config(args).to_dict()
    assert {k: got[k] for k in values} == values


def test_every_study_has_its_baseline_and_folder_safe_arm_names():
    assert set(STUDIES) == {"vsl", "batch-size", "semantics", "rank"}
    for study in STUDIES.values():
        names = [a.name for a in study.arms]
        assert study.baseline in names and len(set(names)) == len(names)
        assert all(n.replace("-", "").isalnum() for n in names)
        for arm in study.arms:                              # every arm is a valid configuration
            Config.from_dict({**arm.overrides, "vsl_weight": arm.overrides.get("vsl_weight", 10.0)}, strict=True)
    assert get_study("batch-size").arm("bs32").overrides == {"batch_size": 32}


def test_slots_split_the_cores_on_cpu_and_give_one_run_per_gpu(monkeypatch):
    import torch

    from vsl.ablate.runner import choose_slots

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert choose_slots("cpu", 10) == Slots(10, 1) and choose_slots("cpu", 3) == Slots(3, 5)
    assert choose_slots("cpu", 10, jobs=4).env(3) == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    slots = choose_slots("auto", 10)
    assert slots.jobs == 3 and [slots.env(k)["CUDA_VISIBLE_DEVICES"] for k in range(3)] == ["0", "1", "2"]
    assert choose_slots("cuda:1", 10) == Slots(1, 16)           # one named GPU: runs take turns
    with pytest.raises(ConfigError, match="--jobs must be positive"):
        choose_slots("cpu", 3, jobs=0)


# --- a study folder without training: fake commands ----------------------------------------------
@pytest.fixture
def tiny_data(tmp_path_factory):
    from vsl.data import demo as dd

    out = tmp_path_factory.mktemp("data")
    info = dd.make_demo_data(out, dd.DemoSpec(seed=1, train_images=20, dev_images=6, test_images=8, img_dim=16))
    return info


def _given(info, **more):
    return {"data_path": info["data_path"], "vocab_path": info["vocab_path"], "data_name": info["data_name"],
            "word_dim": 8, "embed_size": 8, "sim_dim": 8, "batch_size": 10, "num_epochs": 1, "workers": 0,
            "max_violation": False, "device": "cpu", "log_step": 1, "val_step": 0, **more}


class FakeRun(Run):
    """Commands that write what vsl train / vsl eval write, in a fraction of a second."""

    fail_seed = None

    def train_argv(self):
        code = ("import json,sys,pathlib; f=pathlib.Path(sys.argv[1]); (f/'checkpoints').mkdir(parents=True, "
                "exist_ok=True); [ (f/'checkpoints'/n).write_text('x') for n in ('model_best.pth.tar', "
                "'checkpoint_last.pth.tar')]; (f/'logs').mkdir(exist_ok=True); (f/'logs'/'metrics.jsonl').write_text("
                "json.dumps({'step': 2, 'split': 'train'})+'\\n'+json.dumps({'step': 2, 'split': 'val', 'epoch': 1, "
                "'rsum': 9.0})+'\\n'); print('resumed' if '--resume' in sys.argv else 'fresh')")
        resume = ["--resume"] if (self.checkpoints / "checkpoint_last.pth.tar").is_file() else []
        return [sys.executable, "-c", code, str(self.folder), *resume]

    def eval_argv(self):
        if self.seed == self.fail_seed:
            return [sys.executable, "-c", "import sys; print('vsl: error: boom.npy: not found'); sys.exit(2)"]
        code = ("import json,sys,pathlib,numpy as np; f=pathlib.Path(sys.argv[1]); s=int(sys.argv[2]); "
                "r={'i2t': {'r1': 10.0+s, 'r5': 50.0, 'r10': 80.0, 'medr': 2.0, 'meanr': 3.0}, "
                "'t2i': {'r1': 5.0, 'r5': 40.0, 'r10': 70.0, 'medr': 3.0, 'meanr': 4.0}}; "
                "r['rsum']=sum(r[d][k] for d in ('i2t','t2i') for k in ('r1','r5','r10')); "
                "(f/'test.json').write_text(json.dumps(r)); "
                "np.savez(f/'ranks.npz', i2t=np.arange(8)%3, t2i=(np.arange(40)+s)%9)")
        return [sys.executable, "-c", code, str(self.folder), str(self.seed + (5 if self.arm.name == 'vsl' else 0))]


def _fake(prepared, fail_seed=None):
    runs = []
    for r in prepared.runs:
        f = FakeRun(r.arm, r.label, r.seed, r.folder, r.values, r.eval_split, r.protocol)
        f.fail_seed = fail_seed
        runs.append(f)
    prepared.runs = runs
    return prepared


def test_study_rows_summary_skip_and_failed_run(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr("vsl.ablate.runner.choose_slots", lambda *a, **k: Slots(2, 1))
    out = tmp_path / "study"
    prepared = _fake(prepare("vsl", 3, out=out, given=_given(tiny_data)), fail_seed=2)
    summary = run_study(prepared, progress=False, plot=True)
    rows = json.loads((out / "runs.json").read_text())
    assert len(rows) == 6 and (out / "runs.csv").read_text().count("\n") == 7
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["arm"], r["seed"]) for r in failed] == [("triplet", 2), ("vsl", 2)]
    assert failed[0]["error"] == "vsl: error: boom.npy: not found"
    # The summary counts the finished runs only and says how many are missing.
    assert summary["arms"]["triplet"]["runs"] == 2 and summary["missing_total"] == 2
    assert summary["baseline"] == "triplet" and set(summary["paired"]) == {"vsl"}
    # i2t R@1 of seed s is 10 + s (baseline) and 15 + s (VSL): means 10.5 and 15.5 over seeds 0, 1.
    assert summary["arms"]["triplet"]["metrics"]["i2t_r1"]["mean"] == pytest.approx(10.5)
    assert summary["arms"]["vsl"]["metrics"]["i2t_r1"]["ci95"] == pytest.approx(
        [15.5 - 12.706205 * 0.5 ** 0.5 / 2 ** 0.5, 15.5 + 12.706205 * 0.5 ** 0.5 / 2 ** 0.5], abs=1e-4)
    assert set(summary["arms"]["vsl"]["metrics"]["rsum"]) == {"mean", "ci95"}
    assert set(summary["paired"]["vsl"]["rsum"]) == {"diff", "ci95"}
    md = (out / "summary.md").read_text()
    assert "2 run(s) not finished" in md and "SGR* (baseline)" in md and (out / "summary.png").stat().st_size
    # Running again: finished runs are skipped, the failed ones are retried (and now succeed).
    prepared = _fake(prepare("vsl", 3, out=out, given=_given(tiny_data)))
    assert sum(r.state() == "finished" for r in prepared.runs) == 4
    summary = run_study(prepared, progress=False, plot=False)
    assert summary["missing_total"] == 0 and summary["arms"]["vsl"]["runs"] == 3
    assert (out / "runs" / "triplet" / "seed_0" / "train.out").read_text().count("$ ") == 1   # not rerun


def test_interrupted_run_is_resumed_and_trained_run_only_evaluated(tmp_path, tiny_data):
    prepared = prepare("vsl", 1, out=tmp_path / "s", given=_given(tiny_data))
    run = prepared.runs[0]
    assert run.state() == "new" and "--resume" not in run.train_argv()
    (run.checkpoints).mkdir(parents=True)
    (run.checkpoints / "checkpoint_last.pth.tar").write_text("x")
    assert run.state() == "partial"
    argv = run.train_argv()
    assert argv[argv.index("--resume") + 1] == str(run.checkpoints / "checkpoint_last.pth.tar")
    (run.checkpoints / "model_best.pth.tar").write_text("x")
    run.status_file.write_text(json.dumps({"trained": True}))
    assert run.state() == "trained" and [c[3] for c in run.commands()] == ["eval"]
    # Fake train that resumes: the executor passes --resume to the interrupted run.
    fake = _fake(prepare("vsl", 1, out=tmp_path / "t", given=_given(tiny_data)))
    r0 = fake.runs[0]
    r0.checkpoints.mkdir(parents=True)
    (r0.checkpoints / "checkpoint_last.pth.tar").write_text("x")
    Executor(fake.runs, Slots(1, 1)).run()
    assert "resumed" in (r0.folder / "train.out").read_text() and r0.state() == "finished"


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, tiny_data, capsys):
    g = _given(tiny_data)
    flags = [f"--{k}" if v is True else None for k, v in g.items()]
    argv = ["ablate", "--study", "batch-size", "--seeds", "2", "--out", str(tmp_path / "b"), "--dry_run",
            "--data_path", g["data_path"], "--vocab_path", g["vocab_path"], "--data_name", g["data_name"],
            "--num_epochs", "1", "--workers", "0", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if not l.startswith("#")]
    assert len(lines) == 6 and all(" -m vsl train " in l and " -m vsl eval " in l for l in lines)
    assert sum("--batch_size 32" in l for l in lines) == 2 and sum("--seed 1 " in l for l in lines) == 3
    assert not (tmp_path / "b").exists()


def test_summary_only_while_running_and_one_study_process_per_folder(tmp_path, tiny_data, capsys):
    import os
    import subprocess

    from vsl.ablate.runner import folder_lock

    out = tmp_path / "s"
    g = _given(tiny_data)
    fake = _fake(prepare("vsl", 2, out=out, given=g))
    Executor(fake.runs[:1], Slots(1, 1)).run()                  # one of four runs finished
    argv = ["ablate", "--study", "vsl", "--seeds", "2", "--out", str(out), "--summary_only", "--no_plot",
            *sum(([f"--{k}", str(v)] for k, v in g.items() if not isinstance(v, bool)), []), "--no_max_violation"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["triplet"]["runs"] == 1 and summary["missing_total"] == 3
    assert "3 run(s) not finished" in capsys.readouterr().out and not (out / ".lock").exists()
    # A live process holds the folder: refused, naming it; a dead one's lock is taken over.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{sleeper.pid}\n")
        with pytest.raises(ConfigError, match=f"another vsl ablate \\(process {sleeper.pid}\\)"):
            with folder_lock(out):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with folder_lock(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
    assert not (out / ".lock").exists()


def test_sigterm_stops_the_study_and_leaves_the_runs_resumable(tmp_path, tiny_data):
    import signal
    import threading

    fake = _fake(prepare("vsl", 1, out=tmp_path / "s", given=_given(tiny_data)))
    run = fake.runs[0]
    run.train_argv = lambda: [sys.executable, "-c", "import time; time.sleep(60)"]
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    start = time.time()
    with pytest.raises(KeyboardInterrupt):
        Executor(fake.runs[:1], Slots(1, 1)).run()
    assert time.time() - start < 30 and run.status()["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


# --- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--study", "nope"], "unknown study 'nope'"),
    (["--study", "vsl", "--arms", "bs32"], "has no arm 'bs32'"),
    (["--study", "vsl", "--seeds", "0"], "--seeds must be a positive"),
    (["--study", "vsl", "--seeds", "-2"], "--seeds must be a positive"),
    (["--study", "vsl", "--seed", "3"], "--seed is set by vsl ablate"),
    (["--study", "rank", "--vsl_weight", "0"], "--vsl_weight must be positive"),
])
def test_bad_input_is_one_line_exit_2(argv, message, tmp_path, tiny_data, capsys):
    g = _given(tiny_data)
    rc = main(["ablate", *argv, "--out", str(tmp_path / "o"), "--data_path", g["data_path"], "--vocab_path",
               g["vocab_path"], "--data_name", g["data_name"], "--dry_run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("vsl: error: ") and err.count("\n") == 1 and message in err, err


def test_a_folder_of_another_study_or_dataset_is_refused_unless_forced(tmp_path, tiny_data):
    out = tmp_path / "s"
    prepared = prepare("vsl", 1, out=out, given=_given(tiny_data))
    prepared.runs[0].folder.mkdir(parents=True)
    with pytest.raises(ConfigError, match=rf"{out}: holds the study 'vsl', not 'rank'"):
        prepare("rank", 1, out=out, given=_given(tiny_data))
    with pytest.raises(ConfigError, match="other training options .*batch_size: 10 -> 20"):
        prepare("vsl", 1, out=out, given=_given(tiny_data, batch_size=20))
    other = Path(tiny_data["data_path"]) / "demo_precomp" / "train_caps.txt"
    other.write_text(other.read_text().replace("dog", "cat"))
    with pytest.raises(ConfigError, match="was written for the dataset 'demo_precomp'.*other files"):
        prepare("vsl", 1, out=out, given=_given(tiny_data))
    prepare("rank", 1, out=out, given=_given(tiny_data), force=True)
    assert not (out / "runs").exists() and json.loads((out / "study.json").read_text())["study"] == "rank"
    # Same study again (another --device, more seeds): accepted, nothing deleted.
    prepare("rank", 3, out=out, given=_given(tiny_data, device="auto"))


# --- end to end (real vsl train / vsl eval) ---------------------------------------------------------
@pytest.mark.slow
def test_a_tiny_real_study_end_to_end(tmp_path, tiny_data, capsys):
    out = tmp_path / "real"
    g = _given(tiny_data)
    argv = ["ablate", "--study", "vsl", "--seeds", "1", "--out", str(out), "--jobs", "2",
            "--data_path", g["data_path"], "--vocab_path", g["vocab_path"], "--data_name", g["data_name"],
            "--word_dim", "8", "--embed_size", "8", "--sim_dim", "8", "--batch_size", "10", "--num_epochs", "1",
            "--workers", "0", "--no_max_violation", "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = json.loads((out / "runs.json").read_text())
    assert [r["status"] for r in rows] == ["finished", "finished"]
    for row in rows:                                  # the row holds exactly what vsl eval wrote
        test = json.loads((Path(row["folder"]) / "test.json").read_text())
        assert row["rsum"] == test["rsum"] and summary["arms"][row["arm"]]["metrics"]["rsum"]["mean"] == test["rsum"]
        with np.load(Path(row["folder"]) / "ranks.npz") as z:
            assert stats.query_contributions(z["i2t"], z["t2i"])["rsum"].mean() == pytest.approx(test["rsum"])
    capsys.readouterr()
    assert main(argv) == 0                            # everything finished: nothing runs again
    assert "0 to run" in capsys.readouterr().out


def test_a_finished_run_is_found_only_in_a_folder_of_the_same_study(tmp_path, tiny_data, monkeypatch):
    """What `vsl serve` reuses of `vsl demo`: a finished run's best checkpoint, only when the folder
    holds exactly this study (same data, recipe and evaluation) and the run has finished."""
    monkeypatch.setattr("vsl.ablate.runner.choose_slots", lambda *a, **k: Slots(1, 1))
    out = tmp_path / "study"
    assert prepare("vsl", 1, out=out, given=_given(tiny_data), dry_run=True).finished_checkpoint("vsl", 0) is None
    run_study(_fake(prepare("vsl", 1, out=out, given=_given(tiny_data))), progress=False, plot=False)
    again = prepare("vsl", 1, out=out, given=_given(tiny_data), dry_run=True)
    assert again.finished_checkpoint("vsl", 0) == out / "runs" / "vsl" / "seed_0" / "checkpoints" / "model_best.pth.tar"
    assert again.finished_checkpoint("vsl", 1) is None                         # no such run
    other = prepare("vsl", 1, out=out, given=_given(tiny_data, num_epochs=2), dry_run=True)
    assert other.finished_checkpoint("vsl", 0) is None                        # another recipe
