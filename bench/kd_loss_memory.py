"""Peak memory and time of the KD loss: chunked (engine.train.kd_loss) vs the naive full-softmax computation.

    python bench/kd_loss_memory.py                  # every variant, each in a fresh process; prints JSON
    python bench/kd_loss_memory.py --variant naive  # one measurement (what the first form runs)
    python bench/kd_loss_memory.py --variants chunked --divergence jsd   # another KD divergence

The workload is one forward + backward of the loss at Qwen2.5's vocab (151,936), batch 2 x seq 1024:

* naive       student logits = h_s @ W_s.T and teacher logits = h_t @ W_t.T for every position, then
              `kd_loss_reference` (full softmax over all B·S positions, masked afterwards);
* chunked     `chunked_kd_loss` from the hidden states and lm-head weights (never more than one chunk of
              logits; checkpointed);
* from_logits the same full logits as naive, then `chunked_kd_loss_from_logits`.

Gradients flow into the student's hidden states and its lm-head weight (as in training); the teacher is
constant. Labels mask a prompt (the first quarter of each row) and right padding in the second row.

Memory, honestly: each variant runs in its own process. CPU: after the inputs exist, the kernel's peak-RSS
mark is reset (/proc/self/clear_refs) and the figure is the peak RSS (getrusage ru_maxrss) minus the RSS
at that moment, i.e. what the loss itself added at its worst, the lm-head gradient included. Where the
mark cannot be reset, the baseline is ru_maxrss after the inputs (inputs are built in place to keep it
close to the RSS). CUDA: torch.cuda.max_memory_allocated minus the allocated bytes after the inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("naive", "chunked", "from_logits")
GRAD_ROWS = 4096  # lm-head gradient rows saved for the cross-variant comparison


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark that ru_maxrss reports (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_inputs(args, torch, device, dtype):
    """Deterministic inputs, built in place (no temporaries that would raise the peak-RSS baseline)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        t = torch.empty(*shape, dtype=torch.float32)
        t.normal_(0.0, scale, generator=g)
        return t.to(device=device, dtype=dtype)

    b, s, v = args.batch, args.seq, args.vocab
    h_s = randn(b, s, args.student_hidden).requires_grad_()
    w_s = randn(v, args.student_hidden, scale=args.student_hidden**-0.5).requires_grad_()
    h_t = randn(b, s, args.teacher_hidden)
    w_t = randn(v, args.teacher_hidden, scale=2 * args.teacher_hidden**-0.5)  # a sharper teacher
    labels = torch.empty(b, s, dtype=torch.long).random_(0, v, generator=g)
    labels[:, : s // 4] = -100  # prompt
    if b > 1:
        labels[1, s - s // 10 :] = -100  # right padding
    return h_s, w_s, h_t, w_t, labels.to(device)


def run_variant(args) -> dict:
    import torch

    from engine.train import kd_loss

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    divergence = kd_loss.Divergence(args.divergence)
    kw = dict(weight=args.weight, temperature=args.temperature, reduction="batchmean", divergence=divergence)

    def loss_of(h_s, w_s, h_t, w_t, labels):
        if args.variant == "chunked":
            return kd_loss.chunked_kd_loss(h_s, w_s, h_t, w_t, labels, chunk_size=args.chunk_size, **kw)
        s_logits = h_s @ w_s.T
        with torch.no_grad():
            t_logits = h_t @ w_t.T
        if args.variant == "naive":
            return kd_loss.kd_loss_reference(s_logits, t_logits, labels, **kw)
        return kd_loss.chunked_kd_loss_from_logits(s_logits, t_logits, labels, chunk_size=args.chunk_size, **kw)

    # warm-up at a toy size: thread pools, kernels and lazy imports are not the loss's memory
    small = argparse.Namespace(**{**vars(args), "batch": 2, "seq": 16, "vocab": 128})
    loss_of(*make_inputs(small, torch, device, dtype)).loss.backward()

    inputs = make_inputs(args, torch, device, dtype)
    h_s, w_s, *_ = inputs
    labels = inputs[-1]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    else:
        reset_ok = reset_peak_rss()
        base_kib = rss_kib() if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    t0 = time.perf_counter()
    out = loss_of(*inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    out.loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()

    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_bytes) / 2**20
        method = "torch.cuda.max_memory_allocated - allocated after inputs"
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024
        method = "ru_maxrss - RSS after inputs (peak mark reset)" if reset_ok else "ru_maxrss growth after inputs"

    result = {
        "variant": args.variant,
        "device": device,
        "dtype": args.dtype,
        "peak_mib": round(peak, 1),
        "memory_method": method,
        "forward_s": round(t1 - t0, 2),
        "backward_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2),
        "loss": out.loss.item(),
        "ce_loss": out.ce_loss.item(),
        "kd_loss": out.kd_loss.item(),
        "tokens": out.tokens,
        "positions": labels.numel(),
    }
    if args.out:
        torch.save(
            {"grad_hidden": h_s.grad.float().cpu(), "grad_head_rows": w_s.grad[:GRAD_ROWS].float().cpu()},
            Path(args.out) / f"{args.variant}.pt",
        )
    return result


def compare(results: dict, out_dir: Path) -> dict:
    import torch

    summary = {}
    base = results.get("naive")
    if base is None:
        return summary
    ref = torch.load(out_dir / "naive.pt")
    for name, res in results.items():
        if name == "naive":
            continue
        got = torch.load(out_dir / f"{name}.pt")
        summary[name] = {
            "memory_ratio_naive_over_variant": round(base["peak_mib"] / max(res["peak_mib"], 1e-9), 2),
            "speed_ratio_naive_time_over_variant": round(base["total_s"] / res["total_s"], 2),
            "max_abs_diff_loss": abs(res["loss"] - base["loss"]),
            "max_abs_diff_grad_hidden": (got["grad_hidden"] - ref["grad_hidden"]).abs().max().item(),
            "max_abs_grad_hidden": ref["grad_hidden"].abs().max().item(),
            f"max_abs_diff_grad_lm_head_first_{GRAD_ROWS}_rows": (
                (got["grad_head_rows"] - ref["grad_head_rows"]).abs().max().item()
            ),
            "max_abs_grad_lm_head": ref["grad_head_rows"].abs().max().item(),
        }
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=VARIANTS, help="measure one variant in this process")
    p.add_argument("--variants", default=",".join(VARIANTS), help="variants the driver runs (comma list)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--student-hidden", type=int, default=1280, help="student.hidden_size default")
    p.add_argument("--teacher-hidden", type=int, default=1536, help="Qwen2.5-1.5B (the assistant)")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--weight", type=float, default=0.3)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--divergence", default="forward_kl", help="knowledgedistillation.loss.divergence")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", help="folder for the gradients (set by the driver)")
    args = p.parse_args()

    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--variant", variant, "--out", tmp]
            for key in (
                "batch",
                "seq",
                "vocab",
                "student_hidden",
                "teacher_hidden",
                "chunk_size",
                "weight",
                "temperature",
                "divergence",
                "dtype",
                "device",
            ):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                results[variant] = {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
                continue
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{variant}: {results[variant]['peak_mib']} MiB, {results[variant]['total_s']} s", file=sys.stderr)
        ok = {k: v for k, v in results.items() if "error" not in v}
        comparison = compare(ok, Path(tmp))
    shape = {
        k: getattr(args, k)
        for k in ("batch", "seq", "vocab", "student_hidden", "teacher_hidden", "chunk_size", "divergence", "dtype")
    }
    print(json.dumps({"shape": shape, "results": results, "vs_naive": comparison}, indent=2))


if __name__ == "__main__":
    main()
