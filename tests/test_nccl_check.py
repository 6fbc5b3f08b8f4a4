"""CPU-side tests of the multi-process NCCL check (benchmarks/nccl_check.sh,
benchmarks/nccl_ring.py): arguments, the NCCL version choice, the table and
JSON writers, the process runner's timeouts, and the script's dry run.  The
GPU part (k NCCL ranks on one device) runs only on a GPU machine, through the
script itself; nothing here needs a GPU or NCCL."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "nccl_check.sh")
DRIVER = os.path.join(ROOT, "benchmarks", "nccl_ring.py")

spec = importlib.util.spec_from_file_location("nccl_ring", DRIVER)
nr = importlib.util.module_from_spec(spec)
sys.modules["nccl_ring"] = nr  # spawned children find the module's functions by this name
spec.loader.exec_module(nr)


# ------------------------------------------------------------------ arguments
def test_defaults_are_the_issue_configuration():
    a = nr.parse_args([])
    assert a.ks == [2, 4] and a.n == 8192 and a.configs == ["seed", "dense"] and a.dtypes == ["bf16", "fp16"]
    assert a.comm_timeout == 60.0 and not a.no_absent and not a.dry_run
    kw, h, d = nr.config_kwargs("seed", a.n)
    assert kw == {"segment_lengths": [2048, 4096], "dilation_rates": [1, 2], "causal": True} and (h, d) == (12, 64)
    kw, h, d = nr.config_kwargs("dense", a.n)
    assert kw == {"segment_lengths": [8192], "dilation_rates": [1], "causal": True}


def test_parse_lists_and_options():
    a = nr.parse_args(["--ks", "1,2,8", "--configs", "dense", "--dtypes", "fp16", "--iters", "0",
                       "--no-absent", "--dry-run", "--json", "x.json"])
    assert a.ks == [1, 2, 8] and a.configs == ["dense"] and a.dtypes == ["fp16"] and a.iters == 0
    assert a.no_absent and a.dry_run and a.json == "x.json"


@pytest.mark.parametrize("argv", [["--ks", "2,x"], ["--ks", "0"], ["--ks", ""], ["--configs", "seed,nope"],
                                  ["--dtypes", "fp32"], ["--n", "8190", "--ks", "4"], ["--n", "0"],
                                  ["--comm-timeout", "0"], ["--join-timeout", "-1"], ["--iters", "-1"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        nr.parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_plan_lists_every_step():
    steps = nr.plan_steps(nr.parse_args([]))
    ring = [s for s in steps if s["step"] == "ring"]
    assert len(ring) == 2 * 2 * 2
    assert {(s["k"], s["step"]) for s in steps if s["step"] != "ring" and s["k"]} == {
        (k, s) for k in (2, 4) for s in ("mismatch-op", "mismatch-config", "after-mismatch", "absent-rank")}
    assert len([s for s in steps if s["step"] == "baseline"]) == 4
    assert not [s for s in nr.plan_steps(nr.parse_args(["--no-absent"])) if s["step"] == "absent-rank"]


# ------------------------------------------------------------------ NCCL version choice
def test_decode_version():
    assert nr.decode_version(23007) == (2, 30, 7)
    assert nr.decode_version(22805) == (2, 28, 5)
    assert nr.decode_version(2804) == (2, 8, 4)  # before 2.9: x*1000+y*100+z


def test_choose_new_default_library():
    code, lib, msg = nr.choose_nccl("", (2, 30, 7), None, None)
    assert code is None and lib is None and "2.30.7" in msg


def test_choose_old_default_without_carried_build_stops_with_3():
    code, lib, msg = nr.choose_nccl("", (2, 28, 9), None, None)
    assert code == nr.EXIT_OLD_NCCL == 3 and lib is None
    assert "2.28.9" in msg and "older than 2.30" in msg and "several ranks per GPU" in msg
    assert "build-nccl/lib/libnccl.so.2" in msg and "stopping" in msg


def test_choose_unloadable_default_says_so():
    code, _, msg = nr.choose_nccl("", None, None, None)
    assert code == 3 and "cannot be loaded" in msg


def test_choose_old_default_with_carried_build():
    code, lib, msg = nr.choose_nccl("", (2, 27, 3), "/r/build-nccl/lib/libnccl.so.2", (2, 30, 7))
    assert code is None and lib == "/r/build-nccl/lib/libnccl.so.2" and "carried" in msg


def test_choose_old_carried_build_is_not_used():
    code, lib, msg = nr.choose_nccl("", (2, 27, 3), "/r/build-nccl/lib/libnccl.so.2", (2, 29, 7))
    assert code == 3 and lib is None and "2.29.7" in msg


def test_choose_env_library_wins_or_stops():
    assert nr.choose_nccl("/x/libnccl.so.2", (2, 31, 0), None, None)[:2] == (None, "/x/libnccl.so.2")
    code, lib, msg = nr.choose_nccl("/x/libnccl.so.2", (2, 28, 3), "/c", (2, 30, 7))
    assert code == 3 and lib is None and "RINGATTN_NCCL_LIBRARY" in msg  # set but old: no fallback
    assert nr.choose_nccl("/x/libnccl.so.2", None, None, None)[0] == 3


@pytest.fixture
def fake_nccl(tmp_path):
    """Build a shared library with only ncclGetVersion: fake_nccl(code) -> path."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed (the project's build needs one too)"

    def make(code, path=None):
        src = tmp_path / f"fake{code}.c"
        src.write_text(f"int ncclGetVersion(int *v) {{ *v = {code}; return 0; }}\n")
        path = str(path or tmp_path / f"libfake{code}.so")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        subprocess.run([cc, "-shared", "-fPIC", "-o", path, str(src)], check=True)
        return path
    return make


def test_library_version_reads_ncclGetVersion(fake_nccl):
    path = fake_nccl(23007)
    version, loaded = nr.nccl_library_version(path)
    assert version == (2, 30, 7) and os.path.samefile(loaded, path)
    assert nr.nccl_library_version("/nonexistent/libnccl.so.2")[0] is None


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RINGATTN_NCCL_LIBRARY", "NCCL_MULTI_RANK_GPU_ENABLE", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG"):
        monkeypatch.delenv(name, raising=False)  # restored after the test, whatever main() sets
    return monkeypatch


def _old_default(monkeypatch, version=(2, 28, 9)):
    real = nr.nccl_library_version
    monkeypatch.setattr(nr, "nccl_library_version",
                        lambda path: (version, "/old/libnccl.so.2") if path == "libnccl.so.2" else real(path))


def test_main_old_nccl_no_carried_build_exits_3(clean_env, tmp_path, capsys):
    _old_default(clean_env)
    out = tmp_path / "r.json"
    assert nr.main(["--dry-run", "--json", str(out)], repo=str(tmp_path)) == 3
    text = capsys.readouterr().out
    assert "nccl probe: ringattn_nccl = 2.28.9" in text
    assert "STOP: NCCL 2.28.9 is older than 2.30" in text and "refuses several ranks per GPU" in text
    payload = json.loads(out.read_text())
    assert payload["result"] == "old-nccl" and payload["nccl"]["exit"] == 3


def test_main_old_nccl_uses_carried_build(clean_env, tmp_path, capsys, fake_nccl):
    _old_default(clean_env)
    carried = fake_nccl(23007, tmp_path / "build-nccl" / "lib" / "libnccl.so.2")
    out = tmp_path / "r.json"
    assert nr.main(["--dry-run", "--json", str(out)], repo=str(tmp_path)) == 0
    assert os.environ["RINGATTN_NCCL_LIBRARY"] == carried  # what the spawned ranks inherit
    assert os.environ["NCCL_MULTI_RANK_GPU_ENABLE"] == "1"
    text = capsys.readouterr().out
    assert "using the carried build" in text and "NCCL 2.30.7, n = 8192" in text
    payload = json.loads(out.read_text())
    assert payload["nccl"]["library"] == carried and payload["result"] == "dry-run"


def test_main_pins_the_probed_default_library(clean_env, tmp_path, capsys):
    clean_env.setattr(nr, "nccl_library_version", lambda path: ((2, 30, 7), "/new/libnccl.so.2"))
    assert nr.main(["--dry-run"], repo=str(tmp_path)) == 0
    assert os.environ["RINGATTN_NCCL_LIBRARY"] == "/new/libnccl.so.2"  # the ranks load what was probed
    assert "NCCL 2.30.7, n = 8192" in capsys.readouterr().out


def test_script_stops_with_3_on_old_env_library(fake_nccl, tmp_path):
    """The shell script end to end (no build, no GPU): an old library named by
    RINGATTN_NCCL_LIBRARY ends the check with exit 3 and the message."""
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable,
               RINGATTN_NCCL_LIBRARY=fake_nccl(22805))
    r = subprocess.run(["bash", SCRIPT], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "NCCL older than 2.30" in r.stdout
    log = (tmp_path / "out" / "nccl_ring.log").read_text()
    assert "nccl probe: ringattn_nccl = 2.28.5" in log and "refuses several ranks on one GPU" in log


def test_script_dry_run_writes_plan_and_table(fake_nccl, tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable,
               RINGATTN_NCCL_LIBRARY=fake_nccl(23007))
    r = subprocess.run(["bash", SCRIPT, "--ks", "2", "--configs", "dense"], check=False, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().splitlines()[-1].startswith("| 2 | absent-rank | not run")  # the table is last
    payload = json.loads((tmp_path / "out" / "nccl.json").read_text())
    assert payload["result"] == "dry-run" and payload["nccl"]["ringattn_nccl"] == "2.30.7"
    assert payload["env"]["NCCL_MULTI_RANK_GPU_ENABLE"] == "1"
    assert {s["step"] for s in payload["plan"]} >= {"ring", "mismatch-op", "absent-rank", "baseline"}
    assert (tmp_path / "out" / "nccl_table.txt").read_text().startswith("NCCL 2.30.7")


def _script_text():
    with open(SCRIPT) as f:
        return f.read()


def test_script_budget_bounds_everything(tmp_path):
    """NCCL_CHECK_BUDGET puts the whole script under timeout(1)."""
    text = _script_text()
    assert 'exec timeout --kill-after=15 "${NCCL_CHECK_BUDGET:-270}"' in text
    assert "timeout --kill-after=10" in text  # the driver under the remaining time


# ------------------------------------------------------------------ table and JSON
def _records(k=2, ok=True, err=1e-3):
    recs = []
    for r in range(k):
        recs.append({"k": k, "rank": r, "step": "init", "ok": True, "seconds": 1.0})
        recs.append({"k": k, "rank": r, "step": "ring", "config": "dense", "dtype": "bf16", "ok": ok,
                         "errors": {"o": err, "dq": 2 * err, "dk": err, "dv": err}, "tolerance": 2e-2,
                         "fwd_peak_bytes": 100 * 2**20, "bwd_peak_bytes": 150 * 2**20, "fwd_bytes_sent": 2**20,
                         "bwd_bytes_sent": 2**21, "steps": 2, "steps_skipped": 0, "torch_peak_bytes": 200 * 2**20, "ms": 3.0 + r})
        for step in ("mismatch-op", "mismatch-config"):
            recs.append({"k": k, "rank": r, "step": step, "ok": True, "raised": "RingAttnError", "message": "differs", "seconds": 0.1})
        recs.append({"k": k, "rank": r, "step": "after-mismatch", "ok": True, "seconds": 0.01})
        recs.append({"k": k, "rank": r, "step": "absent-rank", "ok": True, "absent": True} if r == k - 1 else
                    {"k": k, "rank": r, "step": "absent-rank", "ok": True, "raised": "RingAttnError", "seconds": 5.2})
    recs.append({"step": "baseline", "config": "dense", "dtype": "bf16", "ok": True, "inproc_k1_ms": 4.0, "inproc_k2_ms": 4.5,
                     "shard_k2_ms": 1.5})
    return recs


def test_summarize_passing_run():
    args = nr.parse_args(["--ks", "2", "--configs", "dense", "--dtypes", "bf16"])
    ring_rows, check_rows, ok = nr.summarize(_records(), [], args)
    assert ok
    assert ring_rows == [[2, "dense", "bf16", "ok", "1.0e-03", "2.0e-03", "150.0", "200.0", "3.0", "4.000",
                          "4.500", "1.500"]]
    assert [r[1] for r in check_rows] == ["init", "mismatch-op", "mismatch-config", "after-mismatch", "absent-rank"]
    assert all(r[2] == "ok" and r[3] == "2/2" for r in check_rows)
    assert check_rows[-1][4] == "RingAttnError" and check_rows[-1][5] == "5.20"


def test_summarize_failures_missing_ranks_and_hangs():
    args = nr.parse_args(["--ks", "2", "--configs", "dense", "--dtypes", "bf16"])
    assert not nr.summarize(_records(ok=False, err=0.5), [], args)[2]
    recs = [r for r in _records() if not (r.get("rank") == 1 and r["step"] == "ring")]
    ring_rows, _, ok = nr.summarize(recs, [], args)
    assert not ok and ring_rows[0][3] == "FAIL"
    _, check_rows, ok = nr.summarize(_records(), ["k2-rank1"], args)
    assert not ok and check_rows[-1][:4] == ["-", "hung", "FAIL", "k2-rank1"]
    recs = _records() + [{"k": 2, "rank": 0, "step": "error", "ok": False, "raised": "RingAttnError", "message": "boom"}]
    _, check_rows, ok = nr.summarize(recs, [], args)
    assert not ok and check_rows[-1][1:3] == ["error", "FAIL"]
    ring_rows, _, ok = nr.summarize([], [], nr.parse_args(["--ks", "2"]))
    assert not ok and ring_rows[0][3] == "MISSING"


def test_table_and_json_writer(tmp_path):
    args = nr.parse_args(["--ks", "2", "--configs", "dense", "--dtypes", "bf16"])
    ring_rows, check_rows, _ = nr.summarize(_records(), [], args)
    table = nr.format_table(ring_rows, check_rows, "NCCL 2.30.7, n = 8192")
    lines = table.splitlines()
    assert lines[0] == "NCCL 2.30.7, n = 8192"
    assert lines[1] == "| " + " | ".join(nr.RING_HEAD) + " |"
    assert all(line.count("|") == len(nr.RING_HEAD) + 1 for line in lines[1:4])
    assert all(line.count("|") == len(nr.CHECK_HEAD) + 1 for line in lines[5:])
    nr.write_results(str(tmp_path / "a.json"), str(tmp_path / "t.txt"), {"records": _records(), "x": (1, 2)}, table)
    assert json.loads((tmp_path / "a.json").read_text())["x"] == [1, 2]
    assert (tmp_path / "t.txt").read_text() == table


# ------------------------------------------------------------------ the process runner
def _child_ok(results, name):
    results.put({"step": "ring", "name": name, "ok": True})


def _child_hang(results, name):
    results.put({"step": "init", "name": name, "ok": True})
    time.sleep(600)


def _child_crash(results, name):
    os._exit(7)


def test_run_processes_collects_kills_hangs_and_reports_crashes():
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=f, name=n, args=(results, n))
             for f, n in ((_child_ok, "a"), (_child_hang, "b"), (_child_crash, "c"))]
    t = time.monotonic()
    records, hung = nr.run_processes(procs, 10.0, results)
    assert time.monotonic() - t < 60
    assert hung == ["b"] and not procs[1].is_alive()
    assert {r.get("name") for r in records if r.get("ok")} == {"a", "b"}
    assert {"step": "exit", "process": "c", "ok": False, "exitcode": 7} in records


# ------------------------------------------------------------------ the ranks' steps, rehearsed over MPI
def test_rank_steps_rehearsed_over_mpi(tmp_path):
    """Every step a GPU rank runs (ring vs one rank, stats, the mismatched
    calls, the call after them, close), on the CPU over an MPI communicator:
    the same agreement code that NCCL communicators run.  The absent-rank
    step is left out here: over MPI the timed-out rank aborts the job
    (MPI_Abort), which NCCL communicators do not do."""
    import ringattn
    mpirun = shutil.which("mpirun")
    if mpirun is None or not ringattn._ext.have()["mpi"]:  # as tests/test_mpi.py: a reported skip
        pytest.skip("the MPI rehearsal needs mpirun and ringattn built with MPI")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", RINGATTN_NUM_THREADS="1")
    argv = ["--n", "4096", "--iters", "0", "--dtypes", "fp16", "--no-absent", "--comm-timeout", "60"]
    r = subprocess.run([mpirun, "--oversubscribe", "-n", "2", sys.executable, DRIVER, "--rehearse-mpi",
                        "--out", str(tmp_path)] + argv, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    records = [json.loads(line) for rank in range(2)
               for line in (tmp_path / f"rehearse_rank{rank}.jsonl").read_text().splitlines()]
    assert not [x for x in records if x["step"] == "error"], records
    args = nr.parse_args(["--ks", "2"] + argv)
    ring_rows, check_rows, ok = nr.summarize(records, [], args)
    assert ok, (ring_rows, check_rows)
    assert [row[3] for row in ring_rows] == ["ok", "ok"]
    by_step = {(x["step"], x["rank"]): x for x in records}
    for rank in range(2):
        assert "operation differs between ranks: forward on rank 0 but backward on rank 1" in \
            by_step["mismatch-op", rank]["message"]
        assert by_step["mismatch-config", rank]["raised"] == "ValueError"
        assert by_step["after-mismatch", rank]["broken"] is None and by_step["closed", rank]["ok"]
    dense = [x for x in records if x["step"] == "ring" and x["config"] == "dense"]
    assert sum(x["fwd_bytes_sent"] for x in dense) > 0  # the dense causal ring moves blocks


def test_budget_option():
    assert nr.parse_args(["--budget", "200"]).budget == 200.0
    assert nr.parse_args([]).budget is None
    with pytest.raises(SystemExit):
        nr.parse_args(["--budget", "0"])
    assert '--budget "$(( $(left) > 15 ? $(left) - 10 : 5 ))"' in _script_text()
