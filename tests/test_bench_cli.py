"""scripts/bench.py's trace summary: where an accelerator's time goes, read from a perfetto trace."""

import gzip
import json

from scripts_loader import load_script

bench = load_script("bench")


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
    events = meta + [{"ph": "X", "pid": 2, "tid": 7, "ts": 0, "dur": d, "name": n} for n, d in kernels]
    events += [
        {"ph": "X", "pid": 2, "tid": 9, "ts": 0, "dur": 2500.0, "name": "jit_train_step"},  # not a kernel
        {"ph": "X", "pid": 1, "tid": 3, "ts": 0, "dur": 9e6, "name": "PjitFunction(train_step)"},  # host
    ]
    _write_trace(tmp_path, events)

    s = bench.summarize_trace(str(tmp_path), n_steps=2)

    assert s["kernel_ms_per_step"] == 1.0  # 2000 us of kernels over 2 steps
    assert s["by_kind_ms_per_step"] == {"matmul": 0.6, "attention": 0.25, "other": 0.15}
    assert s["threads_ms_per_step"]["XLA Modules"] == 1.25
    top = s["top_kernels"][0]
    assert (top["kind"], top["ms_per_step"], top["share"]) == ("matmul", 0.6, 0.6)
    assert sum(k["share"] for k in s["top_kernels"]) == 1.0


def test_summarize_trace_says_when_there_is_nothing_to_summarize(tmp_path):
    assert "no perfetto_trace" in bench.summarize_trace(str(tmp_path), n_steps=1)["error"]
    host_only = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}}]
    _write_trace(tmp_path, host_only + [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5.0, "name": "f"}])
    assert bench.summarize_trace(str(tmp_path), n_steps=1)["error"] == "no device kernels in the trace"
