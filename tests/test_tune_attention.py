"""The attention launch-config table (kernels/attention_configs.json) and its tuner
(benchmarks/tune_attention.py) without a GPU: the loader's errors, the committed table against the
AOT builds, the winner and rewrite logic on fake timings, a wrong candidate rejected by the check, the
tuner's refusals, and its CPU (--toy) path under the interpreter."""
import json
import os

import pytest
import torch

from benchmarks import targets
from benchmarks import tune_attention as tune
from kernels import attention as attn

TABLE = attn.CONFIG_TABLE


def doc():
    return json.loads(TABLE.read_text())


def write(tmp_path, document) -> str:
    path = tmp_path / "table.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


def test_committed_table_is_what_the_launchers_and_the_aot_builds_use():
    """_CONFIGS is the file's; every entry's config is the first of its candidates; and each entry's
    config is built by kernels/compile.py (aot_configs: the launchers' own launches) for its arch, kind,
    dtype class and head dim."""
    assert attn.load_configs() == attn._CONFIGS
    entries = doc()["entries"]
    assert len(entries) == len(attn.ARCHS) * len(attn.KINDS) * len(attn.DTYPE_CLASSES) * len(attn.HEAD_DIMS)
    built = {(e["arch"], e["kernel"].removeprefix("attn_"), e["config"].split()[1] != "fp32", e["launch"].constexprs["HEAD_DIM"],
              attn.Config(e["launch"].constexprs["BLOCK_M"], e["launch"].constexprs["BLOCK_N"], e["launch"].num_warps,
                          e["launch"].num_stages))
             for e in attn.aot_configs() if "BLOCK_N" in e["launch"].constexprs}
    for e in entries:
        assert e["candidates"][0] == tune.config(e), e
        assert (e["arch"], e["kind"], e["dtype"] == "16-bit", e["head_dim"], attn.Config(*tune.config(e))) in built, e


@pytest.mark.parametrize("break_it, message", [
    (lambda d: d["entries"].pop(7), "no entry for arch=80 kind=fwd dtype=fp32 head_dim=128"),
    (lambda d: d["entries"].append(dict(d["entries"][0])), r"entry 80 \(arch=80 kind=fwd dtype=16-bit head_dim=16\): a second"),
    (lambda d: d["entries"][3].update(block_n=48), r"entry 3 \(arch=80 kind=fwd dtype=16-bit head_dim=128\): config block_n "
                                                   "must be a power of two >= 16, got 48"),
    (lambda d: d["entries"][2].update(num_warps=3), "num_warps must be 1, 2, 4, 8 or 16, got 3"),
    (lambda d: d["entries"][2].update(num_stages=0), "num_stages must be 1..8, got 0"),
    (lambda d: d["entries"][2].update(block_m=64.0), "needs 4 integers"),
    (lambda d: d["entries"][2]["candidates"].append([64, 64, 4]), r"entry 2 .*: candidate needs 4 integers"),
    (lambda d: d["entries"][5].update(kind="bwd"), r"entry 5 .*kind must be one of \('fwd', 'decode'"),
    (lambda d: d["entries"][5].update(arch=True), "arch must be one of"),
    (lambda d: d["entries"][5].update(head_dim=96), "head_dim must be one of"),
    (lambda d: d["entries"][5].pop("num_stages"), "entry 5: needs the fields"),
    (lambda d: d.pop("entries"), "not a config table"),
    (lambda d: d.update(entries={}), "'entries' must be a list"),
])
def test_loader_names_the_file_and_the_entry(tmp_path, break_it, message):
    d = doc()
    break_it(d)
    path = write(tmp_path, d)
    with pytest.raises(ValueError, match=message) as err:
        attn.load_configs(path)
    assert str(err.value).startswith(path)


def test_loader_rejects_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.json: missing"):
        attn.load_configs(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"table\.json: not a config table .*JSONDecodeError"):
        attn.load_configs(write(tmp_path, TABLE.read_text()[:-30]))


# ----------------------------------------------------------------------------- the tuner's logic

E = {"arch": 90, "kind": "fwd", "dtype": "16-bit", "head_dim": 128}


def test_winner_is_the_fastest_correct_candidate():
    rows = [{"candidate": [128, 64, 8, 3], "correct": True, "ms": 2.0},
            {"candidate": [128, 128, 8, 2], "correct": False, "ms": 0.5},  # fastest, but wrong
            {"candidate": [64, 64, 4, 3], "correct": True, "ms": 1.5},
            {"candidate": [128, 32, 8, 3], "correct": True, "ms": None},  # failed to launch
            {"candidate": [128, 64, 4, 3], "correct": True, "ms": float("nan")}]
    assert tune.winner(rows) == [64, 64, 4, 3]
    assert tune.winner([{**r, "correct": False} for r in rows]) is None


def test_rewrite_sets_the_winners_only():
    d = doc()
    i = next(i for i, e in enumerate(d["entries"]) if tune.key(e) == tuple(E.values()))
    old = d["entries"][i]
    new_candidate = [64, 32, 4, 2]
    assert new_candidate not in old["candidates"]
    old["candidates"].append(new_candidate)
    new = tune.rewrite(d, {tuple(E.values()): new_candidate, (90, "dq", "16-bit", 64): None}, "measured here")
    changed = [(a, b) for a, b in zip(d["entries"], new["entries"]) if a != b]
    assert changed == [(old, {**old, "block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2,
                              "source": "measured here", "candidates": [new_candidate, *old["candidates"][:-1]]})]
    with pytest.raises(ValueError, match="not one of its candidates"):
        tune.rewrite(d, {tuple(E.values()): [32, 32, 4, 3]}, "x")


def test_rewritten_table_loads_and_launches_the_winner(tmp_path):
    d = doc()
    entry = next(e for e in d["entries"] if tune.key(e) == tuple(E.values()))
    entry["candidates"].append([64, 32, 4, 2])
    path = tmp_path / "t.json"
    path.write_text(tune.dumps_table(tune.rewrite(d, {tune.key(entry): [64, 32, 4, 2]}, "test")))
    assert attn.load_configs(path)[(90, "fwd", True)][128] == attn.Config(64, 32, 4, 2)
    assert tune.read_table(path)["entries"] == tune.rewrite(d, {tune.key(entry): [64, 32, 4, 2]}, "test")["entries"]
    assert len(path.read_text().splitlines()) > len(d["entries"])  # one entry a line: a retune is a small diff


def test_space_keeps_the_config_first_and_only_valid_candidates():
    d = doc()
    for e in d["entries"]:
        s = tune.space(e)
        assert s[0] == tune.config(e) and len(s) <= tune.MAX_CANDIDATES and not any(map(attn.config_problem, s))
        assert len(s) > 1 if e["dtype"] == "16-bit" else len(s) == 1
        assert all(c[0] == 16 for c in s) if e["kind"] == "decode" else True
        assert set(map(tuple, e["candidates"])) <= set(map(tuple, s))  # the committed space is the filtered one


def test_trying_swaps_one_entry_and_restores_it():
    before = attn._CONFIGS[(80, "dq", True)][64]
    with pytest.raises(RuntimeError):
        with tune.trying(80, "dq", True, 64, [128, 16, 4, 2]):
            assert attn._CONFIGS[(80, "dq", True)][64] == attn.Config(128, 16, 4, 2)
            raise RuntimeError
    assert attn._CONFIGS[(80, "dq", True)][64] == before


needs_kernels = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")


@needs_kernels
def test_a_wrong_candidate_is_never_timed_nor_chosen(monkeypatch):
    """measure() checks against the reference first: a candidate whose output is off is marked wrong,
    not timed, and winner() passes it over although it would have been the fastest."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch = attn._target(torch.device(device))[0]
    e = {**E, "arch": arch, "head_dim": 16}
    shapes = {"check": {"train": (1, 2, 20, None)}, "time": {"train": (1, 2, 20, None)}}
    real_op = tune._op
    bad = [128, 32, 4, 3]

    def op(kind, q, k, v, do):  # the "bad" config's kernel returns garbage
        run = real_op(kind, q, k, v, do)
        if attn._CONFIGS[(arch, "fwd", True)][16] == attn.Config(*bad):
            return lambda: tuple(o + 1 for o in run())
        return run

    monkeypatch.setattr(tune, "_op", op)
    times = iter([5.0, 1.0])
    rows = [tune.measure(e, c, device, torch.float16, shapes, lambda fn: (fn(), next(times))[1])
            for c in ([128, 64, 4, 3], bad, [64, 32, 4, 3])]
    assert [r["correct"] for r in rows] == [True, False, True] and rows[1]["ms"] is None
    assert "max error" in rows[1]["note"] and rows[0]["max_err"] < tune.TOLERANCE[torch.float16]
    assert tune.winner(rows) == [64, 32, 4, 3]


def test_tuner_refuses_without_a_gpu_and_toy_never_writes(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert tune.main(["--out", str(tmp_path)]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune.main(["--toy", "--write", "--out", str(tmp_path)])
    assert "must not rewrite the committed table" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune.main(["--table", str(tmp_path / "missing.json")])
    assert "missing.json: missing" in capsys.readouterr().err


@needs_kernels
def test_toy_run_writes_the_timings_and_a_table_beside_them(tmp_path):
    """The suite's dry-run path: one entry, its first two candidates, CSV and proposed table in --out,
    the committed table untouched."""
    before = TABLE.read_text()
    assert tune.main(["--toy", "--kinds", "fwd", "--out", str(tmp_path)]) == 0
    rows = targets.read_csv(tmp_path / "attention_tuning.csv")
    arch = attn._target(torch.device("cuda" if torch.cuda.is_available() else "cpu"))[0]
    assert [(r["arch"], r["kind"], r["head_dim"], r["shipped"]) for r in rows] == [
        (str(arch), "fwd", "64", "True"), (str(arch), "fwd", "64", "False")]
    assert all(r["correct"] == "True" and float(r["ms"]) > 0 for r in rows)
    assert [r["winner"] for r in rows].count("True") == 1
    proposed = attn.load_configs(tmp_path / "attention_configs.json")
    won = next(r for r in rows if r["winner"] == "True")
    assert proposed[(arch, "fwd", True)][64] == attn.Config(*(int(won[f]) for f in attn._CONFIG_FIELDS))
    assert TABLE.read_text() == before
    (tmp_path / "steps-tune.csv").write_text('step,outcome,seconds,note\ntuning,ok,10,""\n')
    figure = targets.tuned_vs_shipped(targets.Run(tmp_path, dry_run=True))
    assert list(figure) == [f"sm_{arch} fwd 16-bit D=64"] and figure[f"sm_{arch} fwd 16-bit D=64"] >= 1.0


def test_tuning_target_reads_shipped_over_winner(tmp_path):
    head = ",".join(tune.CSV_FIELDS)
    (tmp_path / "attention_tuning.csv").write_text(f"""{head}
90,fwd,16-bit,128,128,64,8,3,True,True,0.01,2.0,False,
90,fwd,16-bit,128,128,128,8,2,False,True,0.01,1.6,True,
90,fwd,16-bit,128,64,64,4,3,False,False,0.9,,False,max error 0.9 > 0.05
90,dq,16-bit,64,128,64,8,3,True,True,0.01,1.0,True,
""")
    (tmp_path / "steps-tune.csv").write_text('step,outcome,seconds,note\ntuning,ok,300,""\n')
    t = next(t for t in targets.TARGETS if t.steps == ("tuning",))
    assert targets.evaluate(t, targets.Run(tmp_path)) == ("1x (worst of 2: sm_90 dq 16-bit D=64)", "pass")
    (tmp_path / "steps-tune.csv").unlink()
    (tmp_path / "steps-extended.csv").write_text('step,outcome,seconds,note\ntuning,not run,0,"gpu_suite.sh --tune"\n')
    (tmp_path / "attention_tuning.csv").unlink()
    assert targets.evaluate(t, targets.Run(tmp_path)) == (
        "not measured: tuning step not run (gpu_suite.sh --tune)", "not measured")


def fake_compile(build: dict) -> dict:
    """kernels/compile.py's row for a build of the space, without compiling: 128-wide key tiles spill in
    the full (non-causal) build only."""
    label = build["config"]
    return {"kernel": build["kernel"], "arch": f"sm_{build['arch']}", "config": label,
            "status": "spills" if "full" in label and "BN=128" in label else "ok"}


def test_space_filter_drops_a_candidate_when_any_of_its_builds_fails(monkeypatch):
    from kernels import compile as aot

    monkeypatch.setattr(aot, "compile_one", fake_compile)
    d = doc()
    entry = next(e for e in d["entries"] if tune.key(e) == tuple(E.values()))
    new, rows = tune.filter_space(d, [90], intersect=False, jobs=1)
    kept = next(e for e in new["entries"] if tune.key(e) == tuple(E.values()))["candidates"]
    space = tune.space(entry)
    assert kept == [c for c in space if c[1] != 128] and kept[0] == tune.config(entry)
    assert {r["candidate"][1] for r in rows if r["entry"] == tune.key(entry) and r["status"] != "ok"} == {128}
    assert {len([r for r in rows if r["entry"] == tune.key(entry) and r["candidate"] == c]) for c in space[1:]} == {4}
    # causal and full, with kv_start and without (the sm_90 forward's overlapped loop, which must compile clean too)
    labels = [r["config"] for r in rows if r["entry"] == tune.key(entry) and r["candidate"] == space[1]]
    assert sum("kv_start" in label for label in labels) == 2 and sum("overlap" in label for label in labels) == 2
    assert all(e["candidates"] == o["candidates"] for e, o in zip(new["entries"], d["entries"]) if e["arch"] == 80)
    # --intersect: only what the table already lists is tried again
    entry["candidates"] = entry["candidates"][:2]
    new, _ = tune.filter_space(d, [90], intersect=True, jobs=1)
    kept = next(e for e in new["entries"] if tune.key(e) == tuple(E.values()))["candidates"]
    assert kept == [c for c in entry["candidates"] if c[1] != 128]
