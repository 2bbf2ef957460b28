"""Every kernel build the launchers pick compiles ahead of time for sm_80 and sm_90 (no GPU needed):
no register spills, shared memory within the arch's limit, wgmma in the Hopper matmul kernels and
not serialized by ptxas, the sm_90 forward's next QKᵀ in flight during its softmax, 64-bit offsets
where the modules ask for them.

The compile runs in a subprocess without TRITON_INTERPRET (other test modules set it, and the
interpreter replaces @triton.jit functions). Cold, its 1,384 builds take about 13 CPU-minutes per
Triton version (672 of them took 744 s on 2 busy cores under Triton 3.9), so the
table reads the builds that did not change from the committed record (kernels/aot_record.json,
keyed by what Triton compiles) and compiles the rest; a sample of the recorded builds (the first of
each kernel) is compiled every time and must match its record. After changing a kernel, refresh
the record under both Triton versions:
    python -m kernels.compile --record --update-record      (and .venv-compat/bin/python -m ...)
make test and make test-compat check one arch each (LLM_ENGINE_AOT_ARCHS).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import compile as aot

ROOT = Path(__file__).resolve().parents[1]


# Which archs to compile for: both by default; the Makefile's CI targets split them between the
# two Triton versions (sm_80 under the newest, sm_90 under the GPU machines' 3.6) to halve the cold cost.
ARCHS = sorted(int(a) for a in os.environ.get("LLM_ENGINE_AOT_ARCHS", "80,90").split(","))


def compile_table(*flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "kernels.compile", "--json", "--arch", *map(str, ARCHS), *flags], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert out.stdout.strip(), out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rows():
    """The whole table: unchanged builds from the record, the others compiled."""
    table = compile_table("--record")
    print(f"{sum(r['seconds'] is not None for r in table)} of {len(table)} builds compiled, the rest recorded")
    return table


@pytest.mark.slow
def test_record_matches_a_fresh_compile(rows):
    """The first build of every kernel and arch, compiled now without the record, gives the row the
    table holds for it: a record written by another toolchain, or by hand, fails here."""
    sample = compile_table("--sample")
    assert len(sample) >= 10 * len(ARCHS)
    table = {(r["kernel"], r["arch"], r["config"]): r for r in rows}
    for fresh in sample:
        held = table[fresh["kernel"], fresh["arch"], fresh["config"]]
        assert {c: held[c] for c in aot.RECORDED} == {c: fresh[c] for c in aot.RECORDED}, fresh


@pytest.mark.slow
def test_every_config_builds_for_each_arch(rows):
    configs = aot.collect_configs()
    expected = sorted((c["kernel"], f"sm_{c['arch']}", c["config"]) for c in configs if c["arch"] in ARCHS)
    assert sorted((r["kernel"], r["arch"], r["config"]) for r in rows) == expected
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in ARCHS}
    assert {c["kernel"].split("_")[0] for c in configs} >= {"attn", "ln"}  # both kernel modules listed


@pytest.mark.slow
def test_no_spills_smem_fits_wgmma_overlap_and_wide_offsets(rows):
    wgmma = {(c["kernel"], f"sm_{c['arch']}", c["config"]) for c in aot.collect_configs() if c["wgmma"]}
    assert wgmma, "no configuration requires wgmma"
    overlap = {(c["kernel"], f"sm_{c['arch']}", c["config"]) for c in aot.collect_configs() if c.get("overlap")}
    assert overlap, "no configuration asks for the QKᵀ / softmax overlap"
    assert any(c["wide"] for c in aot.collect_configs()), "no configuration asks for 64-bit offsets"
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['config']}: {r['status']}"
        assert r["regs"] is not None, where
        assert r["spill"] == 0, where
        assert r["smem"] <= aot.SMEM_LIMIT[int(r["arch"][3:])], where
        if (r["kernel"], r["arch"], r["config"]) in wgmma:
            assert r["wgmma"] > 0, where
        if (r["kernel"], r["arch"], r["config"]) in overlap:
            assert r["overlap"] > 0, where
        assert r["status"] == "ok", where  # also: no offset the module asks to be 64-bit computed in 32, no serialized wgmma


def test_table_formatting():
    row = {"kernel": "k", "arch": "sm_90", "config": "c", "regs": 32, "spill": 0, "smem": 0, "wgmma": None,
           "tma": 2, "overlap": 1, "ctas": 16, "seconds": 0.1, "status": "ok"}
    lines = aot.format_table([row]).splitlines()
    assert lines[0].split() == list(aot.COLUMNS)
    assert lines[2].split()[:10] == ["k", "sm_90", "c", "32", "0", "0", "-", "2", "1", "16"]


def test_wgmma_in_flight_reads_ptx():
    """A wgmma group counts as overlapped when an ex2 runs between its commit and the next wait (the
    sm_90 forward's loop, shortened: P·V waited for at once, then QKᵀ left running through the softmax)."""
    waited = """
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1}, {%r2}, %rd76, %p52, 1, 1, 1;
	wgmma.commit_group.sync.aligned;
	wgmma.wait_group.sync.aligned 0;
	ex2.approx.ftz.f32 	%r560, %r559;
"""
    running = """
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r437}, %rd28, %rd81, 0, 1, 1, 0, 0;
	wgmma.commit_group.sync.aligned;
	max.f32 	%r527, %r495, %r496;
	ex2.approx.ftz.f32 	%r561, %r560;
"""
    assert aot.wgmma_in_flight(waited) == 0
    assert aot.wgmma_in_flight(waited + running) == 1
    assert aot.wgmma_in_flight(waited + running + waited) == 1  # the next wait closes it
    assert aot.wgmma_in_flight(running.replace("ex2.approx.ftz.f32", "mul.f32")) == 0


def test_wgmma_serialized_reads_the_ptxas_report(monkeypatch):
    """The note ptxas -v printed for the forward's first overlapped loop (its back edge copied the
    in-flight scores), and a report without one."""
    note = ("ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
            "non wgmma instructions reading accumulator registers of  a wgmma between start and end of the pipeline "
            "stage in the function '_attn_fwd'\nptxas info    : Used 232 registers\n")
    ran, real_run = [], subprocess.run
    for log, expected in ((note, "C7514"), ("ptxas info    : Used 180 registers\n", None)):
        def run(cmd, log=log, **kw):  # (Triton's own calls, e.g. ptxas --version, run for real)
            if "-v" not in cmd:
                return real_run(cmd, **kw)
            ran.append(cmd)
            return subprocess.CompletedProcess(cmd, 0, "", log)
        monkeypatch.setattr(aot.subprocess, "run", run)
        assert aot.wgmma_serialized("// ptx", 90) == expected
    assert all("-v" in cmd and "--gpu-name=sm_90a" in cmd for cmd in ran)


@pytest.mark.parametrize("arch,regs,warps,smem,ctas", [
    (90, 76, 16, 0, 1),  # LayerNorm backward at 74-76 registers x 512 threads: one CTA (issue 19)
    (90, 64, 16, 9216, 2),  # 64 registers: 2048 per warp, 32 warps per SM
    (90, 186, 8, 132096, 1),  # 186 -> 6144 per warp, 2 warps per partition: 8 warps
    (90, 128, 4, 100 * 1024, 2),  # shared memory: 2 x (100 KB + 1 KB) <= 228 KB
    (80, 128, 4, 100 * 1024, 1),  # ... > 164 KB
    (80, 40, 4, 128, 12),  # 1280 -> 12 warps per partition, 48 per SM
    (90, 16, 1, 0, 32),  # the 32-CTA cap
])
def test_ctas_per_sm(arch, regs, warps, smem, ctas):
    assert aot.ctas_per_sm(arch, regs, warps, smem) == ctas


def test_every_anchor_names_a_build():
    """Each anchor line of the table sits beside a build that the launchers pick, and prints it."""
    configs = aot.collect_configs()
    anchors = aot.anchors()
    assert {a["kernel"] for a in anchors} >= {"attn_fwd", "attn_decode", "attn_dkdv", "attn_dq", "ln_fwd", "ln_bwd_dx"}
    rows = [{**{c: 0 for c in aot.COLUMNS}, "kernel": c["kernel"], "arch": f"sm_{c['arch']}", "config": c["config"]}
            for c in configs]
    for a in anchors:
        assert aot.ours_for(a, rows) is not None, a
    text = aot.format_anchors(rows)
    assert len(text.splitlines()) == len(anchors) and "FA3" in text and "Liger" in text
    assert aot.format_anchors([row for row in rows if row["arch"] == "sm_80"]).count("\n") < len(anchors) - 1


def test_widened_params_reads_ptx():
    """Lines from the sm_90 PTX of attn_fwd before (stride_qm = param 9 only in 32-bit products) and
    after the offsets went 64-bit (its start · stride a mul.wide)."""
    before = """
	ld.param.b32 	%r84, [_attn_fwd_param_9];
	ld.param.s32 	%rd20, [_attn_fwd_param_8];
	ld.param.b32 	%r8, [_attn_fwd_param_12];
	mul.lo.s32 	%r94, %r84, %r7;
	mul.wide.s32 	%rd9, %r80, 2;
"""
    after = before.replace("mul.lo.s32 	%r94, %r84, %r7;", "mul.wide.s32 	%rd28, %r7, %r84;") + """
	ld.param.b32 	%r57, [_attn_fwd_param_16];
	cvt.s64.s32 	%rd118, %r57;
"""
    assert aot.widened_params(before) == {8}
    assert aot.widened_params(after) == {8, 9, 16}
    # rope's token strides: q's or k's, picked in a branch, reach the conversion through a mov
    branch = """
	ld.param.b32 	%r11, [_rope_kernel_param_9];
	ld.param.b32 	%r14, [_rope_kernel_param_12];
	mov.b32 	%r136, %r11;
	mov.b32 	%r137, %r136;
	cvt.s64.s32 	%rd65, %r137;
"""
    assert aot.widened_params(branch) == {9}
    assert aot.widened_params(branch + "\tmov.b32 \t%r136, %r14;\n") == {9, 12}


def test_module_filter_lists_only_that_modules_builds():
    """--module kernels.rmsnorm: RMSNorm's builds, and the reduction it shares with LayerNorm (one
    label, so collected once); the default lists every module."""
    rms = aot.collect_configs(("kernels.rmsnorm",))
    assert {c["kernel"] for c in rms} == {"rms_fwd", "rms_bwd_dx", "rms_bwd_dx_chunked", "ln_bwd_reduce"}
    every = {(c["kernel"], c["arch"], c["config"]) for c in aot.collect_configs()}
    assert {(c["kernel"], c["arch"], c["config"]) for c in rms} <= every
    with pytest.raises(SystemExit):
        aot.main(["--module", "kernels.nope"])


KEY_CHECK = """
from kernels import compile as aot
builds = [c for c in aot.collect_configs(("kernels.swiglu",)) if c["arch"] == 80]
keys = {aot.build_key(c) for c in builds}
launch = builds[0]["launches"][0]
wider = {**builds[0], "launches": [launch._replace(num_warps=2 * launch.num_warps)]}
other_arch = {**builds[0], "arch": 90}
print(len(builds), len(keys), aot.build_key(wider) in keys, aot.build_key(other_arch) in keys, aot.build_key(builds[0]) in keys)
"""


def test_build_key_tells_builds_apart():
    """Every build has its own key, and a change of launch options or arch changes it (compiled
    kernels, not the interpreter's: hence a process without TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", KEY_CHECK], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    n, distinct, wider_known, arch_known, same_known = out.stdout.split()
    assert int(n) >= 2 and distinct == n, out.stdout
    assert (wider_known, arch_known, same_known) == ("False", "False", "True")


def test_record_serves_unchanged_builds_and_compiles_changed_ones(tmp_path, monkeypatch):
    """Builds whose key the record holds are not compiled, the others are; updating the record keeps
    other Triton versions' entries and replaces this one's."""
    modules = ("kernels.swiglu",)
    builds = [c for c in aot.collect_configs(modules) if c["arch"] == 80]
    assert len(builds) >= 2
    monkeypatch.setattr(aot, "build_key", lambda c: f"{c['kernel']} {c['arch']} {c['config']}")
    fake = lambda c: {"kernel": c["kernel"], "arch": f"sm_{c['arch']}", "config": c["config"], "regs": 1, "spill": 0,  # noqa: E731
                      "smem": 0, "wgmma": 0, "tma": 0, "overlap": 0, "ctas": 1, "status": "ok", "triton": "0.0"}
    record = {aot.build_key(c): fake(c) for c in builds[1:]}  # the first build is not recorded
    compiled = []
    monkeypatch.setattr(aot, "compile_one", lambda cfg: compiled.append(cfg["config"]) or {**fake(cfg), "regs": 2, "seconds": 0.5})
    rows = aot.compile_all((80,), jobs=1, modules=modules, record=record)
    assert compiled == [builds[0]["config"]]
    assert [r["regs"] for r in rows] == [2] + [1] * (len(builds) - 1)
    assert rows[0]["seconds"] == 0.5 and all(r["seconds"] is None for r in rows[1:])
    old = {"key of 1.0": {**fake(builds[0]), "triton": "1.0"}, "stale": {**fake(builds[0]), "triton": aot.triton.__version__}}
    new = aot.updated_record(old, rows, [80], modules)
    assert new["key of 1.0"] == old["key of 1.0"] and "stale" not in new
    assert {k for k in new if k != "key of 1.0"} == {aot.build_key(c) for c in builds}
    assert all(v["triton"] == aot.triton.__version__ and "seconds" not in v for k, v in new.items() if k != "key of 1.0")
    path = tmp_path / "record.json"
    aot.write_record(path, new)
    assert aot.read_record(path) == new and aot.read_record(tmp_path / "none.json") == {}


@pytest.mark.slow
def test_layernorm_backward_starts_no_more_programs_per_sm_than_fit(rows):
    """kernels/layernorm.py's backward tables say how many programs to start per SM (per_sm), copied
    from this table: every N % 16 == 0 build of an entry (LayerNorm and RMSNorm, each dtype) must hold
    that many CTAs per SM, or the last programs run after the others with all their rows."""
    from kernels import layernorm

    checked = 0
    for layout, entries in layernorm._BWD_CONFIGS.items():
        for e in entries:
            words = {"N%16=0", f"ROWS={e.rows}", f"BLOCK_N={e.block_n}", f"w{e.warps}"} | ({f"r{e.maxnreg}"} if e.maxnreg else set())
            kernels = {f"{p}_bwd_dx{'_chunked' if e.chunked else ''}" for p in ("ln", "rms")}
            for r in rows:
                if r["kernel"] in kernels and words <= set(r["config"].split()):
                    assert e.per_sm <= r["ctas"], (layout, e, r)
                    checked += 1
    assert checked >= 20 * len(ARCHS)
