"""scripts/bench.py: a real (tiny) train benchmark and its report, the trace summary, and every kind of
bad input answered with exit code 2 and one line naming the flag or file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scripts_loader import load_script

bench = load_script("bench")
benchlib = load_script("benchlib")
SCRIPT = Path(bench.__file__)


def _bench(*args, **env_vars):
    env = {**os.environ, "JAXGPT_NO_RELAUNCH": "1", "JAXGPT_NO_COMPILE_CACHE": "1", **env_vars}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_train_json_then_report_prints_the_same_result(tmp_path):
    # The real library step on the quick-start model: every figure the JSON promises is there and
    # consistent, and `report` prints the saved result as `train` would have.
    run = _bench(
        "train", "--preset", "quickstart", "--context-length", "32", "--batch-size", "2",
        "--steps", "2", "--warmup", "1", "--references", "none", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["step_source"] == "jaxgpt.train.train_step"
    assert r["tokens_per_s"] == pytest.approx(2 * 32 / (r["step_ms"] / 1000))
    assert r["fraction_of_matmul_peak"] == pytest.approx(r["achieved_gflops"] / r["matmul_gflops"])
    assert r["compile_s"] > 0 and r["peak_rss_mb"] > 0 and r["references"] == {}
    saved = tmp_path / "result.json"
    saved.write_text("a line of noise before the result\n" + run.stdout)

    shown = _bench("report", str(saved))

    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("jaxgpt quickstart T=32 B=2 dtype=float32")
    assert f"tokens_per_s       {r['tokens_per_s']:.1f}" in shown.stdout
    # the host's SIMD level, as /proc/cpuinfo names it, is in the result and printed with it
    assert r["simd"]["host"] in {name for name, _ in benchlib.SIMD_LEVELS} | {"unknown"}
    assert f"  SIMD               host {r['simd']['host']}\n" in shown.stdout


# /proc/cpuinfo flags of a Zen 4 EPYC (AVX-512 with BF16) and of a Zen 3 EPYC (AVX2 and FMA only)
ZEN3 = "fpu sse sse2 pni ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 vaes"
ZEN4 = ZEN3 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16"


@pytest.mark.parametrize(
    ("flags", "level"),
    [
        (ZEN4, "AVX-512-BF16"),
        (ZEN4.replace(" avx512_bf16", ""), "AVX-512"),
        (ZEN3, "AVX2"),
        (ZEN3.replace(" fma", ""), "AVX"),  # AVX2 without FMA is not the AVX2 level
        ("fpu sse sse2", "unknown"),
    ],
)
def test_simd_level_from_cpuinfo_flags(flags, level):
    cpuinfo = f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\nbugs\t\t: sysret_ss_attrs\n"
    assert benchlib.simd_level(benchlib.cpu_flags(cpuinfo)) == level


def test_simd_report_gives_each_library_the_lower_of_the_host_and_its_limit():
    env = {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",  # oneDNN's AVX-512 without BF16
    }
    zen4 = benchlib.simd_report(set(ZEN4.split()), env)
    assert zen4["host"] == "AVX-512-BF16"
    host = "AVX-512-BF16"
    assert zen4["effective"] == {
        "xla_codegen": "AVX2", "ynnpack": host, "onednn": "AVX-512", "aten": "AVX2", "mkl": host
    }  # fmt: skip
    capped = benchlib.simd_report(set(ZEN4.split()), env, capped={"ynnpack": "AVX2"})
    assert capped["effective"]["ynnpack"] == "AVX2"
    line = benchlib.simd_line(capped)
    assert line.startswith(
        "host AVX-512-BF16; limited: XLA codegen AVX2, YNNPACK AVX2, oneDNN AVX-512, ATen AVX2"
    )
    # a limit above an AVX2 host's level changes nothing
    zen3 = benchlib.simd_report(set(ZEN3.split()), env)
    assert set(zen3["effective"].values()) == {"AVX2"} and benchlib.simd_line(zen3) == "host AVX2"


def test_train_under_an_avx2_limit_caps_xla_matmuls_too():
    # Under --xla_cpu_max_isa=AVX2 the bench also caps YNNPACK on a host above AVX2, says so, and
    # trains to the same loss as without the limit (other kernels, other rounding).
    common = (
        "train", "--preset", "quickstart", "--context-length", "32", "--batch-size", "2",
        "--steps", "1", "--warmup", "1", "--references", "none", "--json",
    )  # fmt: skip
    free = _bench(*common)
    limited = _bench(*common, XLA_FLAGS="--xla_cpu_max_isa=AVX2")
    for run in (free, limited):
        assert run.returncode == 0, run.stderr[-2000:]
    free, limited = (json.loads(run.stdout.strip().splitlines()[-1]) for run in (free, limited))
    assert limited["simd"]["limits"]["xla_codegen"] == "AVX2"
    if free["simd"]["host"] in ("AVX-512", "AVX-512-BF16"):
        assert limited["simd"]["effective"]["ynnpack"] == "AVX2", limited["simd"]
        assert "ynnpack_note" not in limited["simd"]
    assert limited["final_loss"] == pytest.approx(free["final_loss"], rel=1e-4)


def test_train_with_the_loss_from_full_logits_reaches_the_same_loss():
    # --loss logits times the same library step with the plain loss bound in its place: the same
    # batches, dropout and updates, so the same final loss as the chunked default.
    common = (
        "train", "--preset", "quickstart", "--context-length", "32", "--batch-size", "2",
        "--steps", "2", "--warmup", "1", "--references", "none", "--json",
    )  # fmt: skip
    runs = {loss: _bench(*common, "--loss", loss) for loss in ("chunked", "logits")}
    for run in runs.values():
        assert run.returncode == 0, run.stderr[-2000:]
    chunked, logits = (json.loads(runs[k].stdout.strip().splitlines()[-1]) for k in ("chunked", "logits"))

    assert logits["loss"] == "logits" and "full logits" in logits["step_source"]
    assert logits["final_loss"] == pytest.approx(chunked["final_loss"], rel=1e-5)


def test_finetune_times_both_settings_against_the_books_code():
    # Not a timing test: a tiny model through every part of the output. Both settings train what
    # the book's code trains (the same count of trainable parameters, counted by PyTorch), and each
    # ratio is jaxgpt's examples/s over the book's.
    pytest.importorskip("llms_from_scratch.ch06")
    run = _bench(
        "finetune", "--preset", "quickstart", "--max-length", "16", "--batch-size", "2",
        "--steps", "1", "--warmup", "1", "--ref-steps", "1", "--lora-rank", "2", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert (r["preset"], r["batch_size"], r["max_length"]) == ("quickstart", 2, 16)
    assert r["machine"].endswith(f"{len(os.sched_getaffinity(0))} cores") and r["date"].count("-") == 2
    assert set(r["modes"]) == {"last-block", "lora"}
    C = 128  # quickstart's width
    block = 4 * C * C + 4 * C + (4 * C * C + 4 * C) + (4 * C * C + C) + 4 * C  # attention, ff, two norms
    assert r["modes"]["last-block"]["trainable_params"] == block + 2 * C + C * 2 + 2
    for mode, mine in r["modes"].items():
        assert mine["examples_per_s"] == pytest.approx(2 / (mine["step_ms"] / 1000)), mode
        assert mine["compile_s"] > 0 and "book" in mine["references"], mode
        for name, ref in mine["references"].items():
            assert ref["trainable_params"] == mine["trainable_params"], (mode, name)
            assert ref["ratio"] == pytest.approx(mine["examples_per_s"] / ref["examples_per_s"])

    text = _bench(
        "finetune", "--preset", "quickstart", "--max-length", "16", "--batch-size", "2", "--modes", "lora",
        "--steps", "1", "--warmup", "0", "--references", "none",
    )  # fmt: skip
    assert text.returncode == 0, text.stderr[-2000:]
    lines = text.stdout.splitlines()
    assert lines[0].startswith("fine-tuning step: quickstart, B=2, T=16, 2 classes") and " cores" in lines[0]
    assert lines[1] == "lora" and lines[2].lstrip().startswith("jaxgpt") and "examples/s" in lines[2]


def test_generate_json_with_a_profile_of_the_decode(tmp_path):
    # The decode benchmark on the quick-start model, with XLA's CPU ops traced: its figures agree
    # with each other, and the profile divides the traced call's op time by its decode steps.
    run = _bench(
        "generate", "--preset", "quickstart", "--batch-sizes", "2", "--new-tokens", "6",
        "--repeats", "1", "--no-hf", "--json", "--profile", str(tmp_path / "trace"),
        XLA_FLAGS="--xla_cpu_enable_xprof_traceme=true",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    (mine,) = r["jaxgpt"]
    assert r["simd"]["host"] in {name for name, _ in benchlib.SIMD_LEVELS} | {"unknown"}
    assert mine["batch_size"] == 2 and "new_ids" not in mine
    assert mine["run_s"] == pytest.approx(2 * 6 / mine["tokens_per_s"], abs=6e-4)  # run_s is rounded to ms
    prof = mine["profile"]
    assert prof["trace"].startswith(str(tmp_path / "trace" / "B2"))
    assert prof["kernel_ms_per_step"] == pytest.approx(sum(prof["by_kind_ms_per_step"].values()))
    assert prof["by_kind_ms_per_step"]["matmul"] > 0 and prof["no_op_ms_per_step"] >= 0


def test_generate_samples_with_the_books_settings_and_rejects_sampling_options_when_greedy():
    run = _bench(
        "generate", "--preset", "quickstart", "--batch-sizes", "2", "--new-tokens", "4",
        "--repeats", "1", "--no-hf", "--json", "--temperature", "1.4", "--top-k", "25",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["sampling"] == {"temperature": 1.4, "top_k": 25, "top_p": None}
    assert r["jaxgpt"][0]["tokens_per_s"] > 0

    greedy = _bench("generate", "--preset", "quickstart", "--top-k", "25", "--no-hf")
    assert greedy.returncode == 2 and "--temperature > 0" in greedy.stderr


def test_generate_after_a_long_prompt_and_not_past_the_context():
    run = _bench(
        "generate", "--preset", "quickstart", "--batch-sizes", "1", "--new-tokens", "3",
        "--repeats", "1", "--no-hf", "--json", "--prompt-tokens", "50",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["prompt_tokens"] == 50 and r["jaxgpt"][0]["tokens_per_s"] > 0

    too_long = _bench("generate", "--preset", "quickstart", "--prompt-tokens", "126", "--new-tokens", "3")
    assert too_long.returncode == 2 and "exceed quickstart's context_length 128" in too_long.stderr


def test_report_names_a_file_without_a_result(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"loss": 1.0}\n')
    for path in (bad, tmp_path / "missing.json"):
        run = _bench("report", str(path))
        assert run.returncode == 2
        assert run.stderr == f"bench.py report: error: {path} holds no `bench.py train --json` result\n"


def _write_trace(directory, planes):
    """An XSpace trace file of ``{plane: {line: [(name, start_us, duration_us), ...]}}``, as
    ``jax.profiler.trace`` writes one, built from its text form by JAX's own profiler module."""
    from jax.profiler import ProfileData

    names: dict[str, int] = {}
    text = []
    for pid, (plane, lines) in enumerate(planes.items(), 1):
        text.append(f'planes {{ id: {pid} name: "{plane}"')
        for tid, (line, events) in enumerate(lines.items(), 1):
            text.append(f'  lines {{ id: {tid} name: "{line}" timestamp_ns: 0')
            for name, start, dur in events:
                mid = names.setdefault(name, len(names) + 1)
                ps = f"offset_ps: {int(start * 1e6)} duration_ps: {int(dur * 1e6)}"  # microseconds in
                text.append(f"    events {{ metadata_id: {mid} {ps} }}")
            text.append("  }")
        text += [f'  event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}' for n, i in names.items()]
        text.append("}")
    folder = directory / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    (folder / "host.xplane.pb").write_bytes(ProfileData.text_proto_to_serialized_xspace("\n".join(text)))


def test_summarize_trace_sums_device_kernels_per_step_by_kind(tmp_path):
    kernels = [  # two steps; durations in microseconds
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 600.0),
        ("cudnn_generated_fort_native_sdpa_sm90_knob_7", 250.0),
        ("loop_add_fusion_3", 100.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 600.0),
        ("cudnn_generated_fort_native_sdpa_sm90_knob_7", 250.0),
        ("loop_add_fusion_3", 100.0),
        ("input_reduce_fusion", 100.0),
    ]
    starts = [sum(d for _, d in kernels[:i]) for i in range(len(kernels))]  # one after the other
    _write_trace(
        tmp_path,
        {
            "/host:CPU": {"python": [("PjitFunction(train_step)", 0, 9e6)]},  # host time is no kernel
            "/device:GPU:0": {
                "Stream #7(Compute)": [(n, t, d) for t, (n, d) in zip(starts, kernels, strict=True)],
                "XLA Modules": [("jit_train_step", 0, 2500.0)],  # the module's own line is no kernel
            },
        },
    )

    s = benchlib.summarize_trace(str(tmp_path), n_steps=2)

    assert s["kernel_ms_per_step"] == pytest.approx(1.0)  # 2000 us of kernels over 2 steps
    assert s["by_kind_ms_per_step"] == pytest.approx({"matmul": 0.6, "attention": 0.25, "other": 0.15})
    top = s["top_kernels"][0]
    assert (top["kind"], top["ms_per_step"], top["share"]) == (
        "matmul",
        pytest.approx(0.6),
        pytest.approx(0.6),
    )
    assert sum(k["share"] for k in s["top_kernels"]) == pytest.approx(1.0)
    assert "no_op_ms_per_step" not in s  # an accelerator's kernels are all traced


def test_summarize_trace_says_when_there_is_nothing_to_summarize(tmp_path):
    assert "no .xplane.pb trace" in benchlib.summarize_trace(str(tmp_path), n_steps=1)["error"]
    _write_trace(tmp_path, {"/host:CPU": {"python": [("f", 0, 5.0)]}})
    assert "no device kernels or XLA CPU ops" in benchlib.summarize_trace(str(tmp_path), n_steps=1)["error"]


def test_summarize_trace_counts_cpu_ops_without_the_ops_nested_in_them(tmp_path):
    # XLA's CPU runtime (with --xla_cpu_enable_xprof_traceme): ops on its pool threads, a loop's
    # body nested in the loop, everything inside the executor's own wrapper event.
    spans = [  # (name, start, duration) in microseconds, one step
        ("ThunkExecutor::Execute", 0, 1000),
        ("ynn_fusion.3", 0, 400),
        ("while.7", 400, 500),
        ("dynamic-slice_fusion", 450, 100),
        ("ynn_fusion.4", 600, 250),
        ("multiply_add_fusion", 900, 100),
    ]
    _write_trace(tmp_path, {"/host:CPU": {"tf_XLAEigen/123": spans, "python": [("$bench.py run", 0, 1000)]}})

    s = benchlib.summarize_trace(str(tmp_path), n_steps=1)

    assert s["kernel_ms_per_step"] == pytest.approx(
        1.0
    )  # the wrapper's own time (none here) and python's are out
    assert s["by_kind_ms_per_step"] == pytest.approx({"matmul": 0.65, "other": 0.35})
    by_name = {k["name"]: k["ms_per_step"] for k in s["top_kernels"]}
    assert by_name["while.7"] == pytest.approx(0.15)  # 500 us minus the 350 us of ops inside the loop
    assert by_name["dynamic-slice_fusion"] == pytest.approx(0.1)
    assert by_name["multiply_add_fusion"] == pytest.approx(0.1)
    assert s["no_op_ms_per_step"] == pytest.approx(0.0)  # one op or another ran all the time


def test_summarize_trace_reports_cpu_time_with_no_op_on_any_thread(tmp_path):
    # Two pool threads. An Eigen matmul (dot.5) records only its launch; its work then runs as
    # untraced thread-pool tasks, which leave only instant bookkeeping markers behind.
    first = [
        ("ynn_fusion.1", 0, 300),
        ("dot.5", 500, 10),
        ("end: dot.5", 510, 0),
        ("ThunkExecutor::Execute", 600, 500),  # a wrapper is no op either
        ("ynn_fusion.1", 2000, 300),  # the next step, 700 us after add_fusion
    ]
    second = [
        ("copy_fusion", 200, 300),  # overlaps the matmul on the other thread
        ("ThreadpoolListener::StartRegion", 700, 0),
        ("add_fusion", 1200, 100),  # 690 us after dot.5 returned
    ]
    _write_trace(tmp_path, {"/host:CPU": {"tf_XLAEigen/1": first, "tf_XLAEigen/2": second}})

    s = benchlib.summarize_trace(str(tmp_path), n_steps=2)

    assert s["no_op_ms_per_step"] == pytest.approx((690 + 700) / 2 / 1000)
    assert s["kernel_ms_per_step"] == pytest.approx((300 + 300 + 10 + 100 + 300) / 2 / 1000)
    assert {k["name"] for k in s["top_kernels"]} == {"ynn_fusion.1", "copy_fusion", "dot.5", "add_fusion"}


# ---- bad input: exit 2, one line naming the flag or file, no traceback, nothing written ----

BAD_INPUTS = [  # (arguments, what the one line must say); {tmp} is a fresh directory
    (["train", "--steps", "0"], "--steps: must be a positive integer"),
    (["train", "--batch-size", "x"], "--batch-size: must be a positive integer"),
    (["train", "--context-length", "-3"], "--context-length: must be a positive integer"),
    (["train", "--warmup", "-1"], "--warmup must be 0 or more"),
    (["train", "--lr", "inf"], "--lr must be a positive finite number"),
    (["train", "--lr", "nan"], "--lr must be a positive finite number"),
    (["train", "--dtype", "float16"], "--dtype: invalid choice"),
    (["train", "--threads", "0"], "--threads: must be a positive integer"),
    (["train", "--references", "hf,tf"], "--references must be 'none' or a comma list of hf, book"),
    (["train", "--preset", "gpt5"], "unknown --preset 'gpt5'"),
    (["train", "--drop-rate", "1.5"], "--drop-rate must be in [0, 1)"),
    (["train", "--activation-dtype", "bfloat16"], "--activation-dtype"),
    (["train", "--profile", "{tmp}/file.txt"], "--profile {tmp}/file.txt is a file, not a directory"),
    (["train", "--profile", "{tmp}/file.txt/sub"], "is not a directory"),
    (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ([], "the following arguments are required: command"),
    (["report", "{tmp}/missing.json"], "{tmp}/missing.json holds no `bench.py train --json` result"),
    (["report", "{tmp}/file.txt"], "{tmp}/file.txt holds no `bench.py train --json` result"),
    (["generate", "--batch-sizes", "1,x"], "--batch-sizes must be a comma list of positive integers"),
    (["generate", "--batch-sizes", "0"], "--batch-sizes must be a comma list of positive integers"),
    (["generate", "--new-tokens", "0"], "--new-tokens: must be a positive integer"),
    (["generate", "--repeats", "-1"], "--repeats: must be a positive integer"),
    (["generate", "--temperature", "-1"], "--temperature must be 0 (greedy) or a positive number"),
    (["generate", "--temperature", "1", "--top-k", "0"], "--top-k: must be a positive integer"),
    (["generate", "--temperature", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["generate", "--preset", "gpt5"], "--preset 'gpt5' is not one of"),
    (["generate", "--profile", "{tmp}/file.txt"], "--profile {tmp}/file.txt is a file, not a directory"),
    (["finetune", "--modes", "last-block,full"], "--modes must be a comma list of last-block, lora"),
    (["finetune", "--max-length", "2000"], "--max-length 2000 is longer than gpt2-small's context of 1024"),
    (["finetune", "--lora-rank", "0"], "--lora-rank: must be a positive integer"),
    (["finetune", "--lora-alpha", "nan"], "--lora-alpha must be a positive finite number"),
    (["finetune", "--references", "hf"], "--references: invalid choice"),
    (["finetune", "--preset", "gpt5"], "--preset: unknown preset 'gpt5'"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) or "nothing" for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_naming_it(tmp_path, capsys, argv, message):
    (tmp_path / "file.txt").write_text("not a result\n")
    before = sorted(tmp_path.rglob("*"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]

    with pytest.raises(SystemExit) as stopped:
        bench.main(argv)

    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_bad_input_from_the_command_line_exits_2_before_any_work(tmp_path):
    run = _bench("train", "--steps", "0", "--profile", str(tmp_path / "trace"))
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == "bench.py train: error: argument --steps: must be a positive integer, got '0'\n"
    assert not (tmp_path / "trace").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["scale", "mesh", "--steps", "0"], "argument --steps: must be a positive integer"),
        (["scale", "mesh", "--cpu-devices", "-2"], "argument --cpu-devices: must be 0 or more"),
        (["scale", "stream", "--gb", "nan"], "argument --gb: must be a positive number of GB"),
    ],
)
def test_bad_scale_input_exits_2_with_one_line(argv, message):
    run = _bench(*argv)  # bench.py hands `scale` to scripts/bench_scale.py in the same process
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr


def test_help_documents_the_exit_codes():
    for argv in (["--help"], ["train", "--help"]):
        run = _bench(*argv)
        assert run.returncode == 0 and "Exit codes: 0 done, 2 bad input" in run.stdout
