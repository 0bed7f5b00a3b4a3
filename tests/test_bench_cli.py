"""scripts/bench.py: a real (tiny) train benchmark and its report, and the trace summary."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scripts_loader import load_script

bench = load_script("bench")
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
    assert greedy.returncode != 0 and "--temperature > 0" in greedy.stderr


def test_generate_after_a_long_prompt_and_not_past_the_context():
    run = _bench(
        "generate", "--preset", "quickstart", "--batch-sizes", "1", "--new-tokens", "3",
        "--repeats", "1", "--no-hf", "--json", "--prompt-tokens", "50",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["prompt_tokens"] == 50 and r["jaxgpt"][0]["tokens_per_s"] > 0

    too_long = _bench("generate", "--preset", "quickstart", "--prompt-tokens", "126", "--new-tokens", "3")
    assert too_long.returncode != 0 and "exceed quickstart's context_length 128" in too_long.stderr


def test_report_names_a_file_without_a_result(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"loss": 1.0}\n')
    for path in (bad, tmp_path / "missing.json"):
        run = _bench("report", str(path))
        assert run.returncode != 0
        assert f"{path} holds no `bench.py train --json` result" in run.stderr


def _write_trace(directory, events):
    folder = directory / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_summarize_trace_sums_device_kernels_per_step_by_kind(tmp_path):
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 9, "name": "thread_name", "args": {"name": "XLA Modules"}},
    ]
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
    events = meta + [
        {"ph": "X", "pid": 2, "tid": 7, "ts": t, "dur": d, "name": n}
        for t, (n, d) in zip(starts, kernels, strict=True)
    ]
    events += [
        {"ph": "X", "pid": 2, "tid": 9, "ts": 0, "dur": 2500.0, "name": "jit_train_step"},  # not a kernel
        {"ph": "X", "pid": 1, "tid": 3, "ts": 0, "dur": 9e6, "name": "PjitFunction(train_step)"},  # host
    ]
    _write_trace(tmp_path, events)

    s = bench.summarize_trace(str(tmp_path), n_steps=2)

    assert s["kernel_ms_per_step"] == 1.0  # 2000 us of kernels over 2 steps
    assert s["by_kind_ms_per_step"] == {"matmul": 0.6, "attention": 0.25, "other": 0.15}
    assert s["threads_ms_per_step"] == {"Stream #7(Compute)": 1.0}  # the module's own line is no kernel
    top = s["top_kernels"][0]
    assert (top["kind"], top["ms_per_step"], top["share"]) == ("matmul", 0.6, 0.6)
    assert sum(k["share"] for k in s["top_kernels"]) == 1.0


def test_summarize_trace_says_when_there_is_nothing_to_summarize(tmp_path):
    assert "no perfetto_trace" in bench.summarize_trace(str(tmp_path), n_steps=1)["error"]
    host_only = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}}]
    _write_trace(tmp_path, host_only + [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5.0, "name": "f"}])
    assert "no device kernels or XLA CPU ops" in bench.summarize_trace(str(tmp_path), n_steps=1)["error"]


def test_summarize_trace_counts_cpu_ops_without_the_ops_nested_in_them(tmp_path):
    # XLA's CPU runtime (with --xla_cpu_enable_xprof_traceme): ops on its pool threads, a loop's
    # body nested in the loop, everything inside the executor's own wrapper event.
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 1, "tid": 5, "name": "thread_name", "args": {"name": "tf_XLAEigen/123"}},
        {"ph": "M", "pid": 1, "tid": 6, "name": "thread_name", "args": {"name": "python"}},
    ]
    spans = [  # (name, start, duration) in microseconds, one step
        ("ThunkExecutor::Execute", 0, 1000),
        ("ynn_fusion.3", 0, 400),
        ("while.7", 400, 500),
        ("dynamic-slice_fusion", 450, 100),
        ("ynn_fusion.4", 600, 250),
        ("multiply_add_fusion", 900, 100),
    ]
    events = meta + [{"ph": "X", "pid": 1, "tid": 5, "ts": t, "dur": d, "name": n} for n, t, d in spans]
    events.append({"ph": "X", "pid": 1, "tid": 6, "ts": 0, "dur": 1000, "name": "$bench.py run"})
    _write_trace(tmp_path, events)

    s = bench.summarize_trace(str(tmp_path), n_steps=1)

    assert s["kernel_ms_per_step"] == 1.0  # the wrapper's own time (none here) and python's are out
    assert s["by_kind_ms_per_step"] == pytest.approx({"matmul": 0.65, "other": 0.35})
    by_name = {k["name"]: k["ms_per_step"] for k in s["top_kernels"]}
    assert by_name["while.7"] == pytest.approx(0.15)  # 500 us minus the 350 us of ops inside the loop
    assert by_name["dynamic-slice_fusion"] == by_name["multiply_add_fusion"] == pytest.approx(0.1)
    assert s["no_op_ms_per_step"] == 0.0  # one op or another ran all the time


def test_summarize_trace_reports_cpu_time_with_no_op_on_any_thread(tmp_path):
    # Two pool threads. An Eigen matmul (dot.5) records only its launch; its work then runs as
    # untraced thread-pool tasks, which leave only instant bookkeeping markers behind.
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 1, "tid": 5, "name": "thread_name", "args": {"name": "tf_XLAEigen/1"}},
        {"ph": "M", "pid": 1, "tid": 6, "name": "thread_name", "args": {"name": "tf_XLAEigen/2"}},
    ]
    spans = [  # (thread, name, start, duration) in microseconds, two steps
        (5, "ynn_fusion.1", 0, 300),
        (6, "copy_fusion", 200, 300),  # overlaps the matmul on the other thread
        (5, "dot.5", 500, 10),
        (5, "end: dot.5", 510, 0),
        (6, "ThreadpoolListener::StartRegion", 700, 0),
        (5, "ThunkExecutor::Execute", 600, 500),  # a wrapper is no op either
        (6, "add_fusion", 1200, 100),  # 690 us after dot.5 returned
        (5, "ynn_fusion.1", 2000, 300),  # the next step, 700 us later
    ]
    events = meta + [{"ph": "X", "pid": 1, "tid": t, "ts": s, "dur": d, "name": n} for t, n, s, d in spans]
    _write_trace(tmp_path, events)

    s = bench.summarize_trace(str(tmp_path), n_steps=2)

    assert s["no_op_ms_per_step"] == pytest.approx((690 + 700) / 2 / 1000)
    assert s["kernel_ms_per_step"] == pytest.approx((300 + 300 + 10 + 100 + 300) / 2 / 1000)
    assert {k["name"] for k in s["top_kernels"]} == {"ynn_fusion.1", "copy_fusion", "dot.5", "add_fusion"}
