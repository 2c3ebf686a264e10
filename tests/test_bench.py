"""benchmarks/bench_peers.py's workers on a tiny GPT-2: every figure is there and sane. No timing assertions (the
speed targets are benchmark figures, see benchmarks/RESULTS.md)."""
import ast
import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_peers as bench  # noqa: E402

TINY = ["--layers", "1", "--width", "64", "--heads", "4", "--vocab", "300", "--r", "4", "--alpha", "32"]
D, R = 64, 4


_RUNS = {}  # each tiny worker runs once per session: the render test reuses the records the other tests made


def _worker(kind, method, *extra):
    key = (kind, method) + extra
    if key not in _RUNS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert bench.main(["--worker", kind, "--method", method] + TINY + list(extra)) == 0
        _RUNS[key] = json.loads(out.getvalue().strip().splitlines()[-1])
    return _RUNS[key]


TRAIN = ("--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1", "--eval_reps", "1", "--dropout", "0.1")
NLG = ("--tiny_nlg", "1", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1", "--data_dir", "/nonexistent")


@pytest.mark.parametrize("method", ["full", "floor", "ours", "ms", "peft"])
def test_train_worker_figures(method):
    if method == "ms" and not (bench.REPO / ".cache" / "loralib-0.1.2-py3-none-any.whl").exists():
        pytest.skip("loralib 0.1.2 wheel not in .cache/ (see benchmarks/reference_wheel.py)")
    if method == "peft":
        pytest.importorskip("peft")
    r = _worker("train", method, *TRAIN)
    model = bench.build_base(bench.argparse.Namespace(layers=1, width=D, heads=4, vocab=300, seq=16))
    base_total = sum(p.numel() for p in model.parameters())
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    # q and v (loralib: A 2r x d, B 2d x r) or all of q|k|v (peft: A r x d, B 3d x r): 4 r d either way
    expected = {"full": base_total, "floor": biases}.get(method, 4 * R * D)
    assert r["params"]["trainable"] == expected
    assert r["params"]["total"] == base_total + (0 if method in ("full", "floor") else 4 * R * D)
    assert len(r["step_s"]) == 2 and all(t > 0 for t in r["step_s"])
    assert r["saved_bytes"] > 0 and r["rss_delta"] >= 0 and r["rss_baseline"] > 0
    assert r["adapter_bytes"] > 0
    assert set(r["eval_median_s"]) == ({"base"} if method in ("full", "floor") else {"base", "unmerged", "merged"})
    if method in bench.LORA_METHODS:
        assert r["merged_vs_unmerged_maxdiff"] <= 1e-4
        assert r["unmerged_vs_base_maxdiff"] > 1e-4  # trained: the update is not zero, the comparison means something


@pytest.mark.parametrize("allocator", ["reuse", "system"])
def test_worker_runs_under_the_chosen_allocator(allocator, monkeypatch):
    monkeypatch.setenv("MALLOC_TOP_PAD_", "12345")  # the caller's own setting never leaks into a worker
    r = bench.run_worker("train", "ours", TINY, allocator, batch=2, seq=8, steps=1, warmup=0, eval_reps=0)
    assert r["malloc_env"] == (bench.MALLOC_ENV if allocator == "reuse" else {k: None for k in bench.MALLOC_ENV})
    with pytest.raises(ValueError, match="allocator must be"):
        bench.worker_env("jemalloc")


def test_dropout_saves_one_byte_per_input_element():
    """With dropout this loralib keeps one mask of bools for backward (one byte per c_attn input element), nothing
    else: not the dropped float copy of the input that a plain autograd graph keeps."""
    args = ("--batch", "2", "--seq", "16", "--steps", "0", "--warmup", "0", "--eval_reps", "0")
    saved = {p: _worker("train", "ours", *args, "--dropout", str(p)) for p in (0.0, 0.1)}
    assert saved[0.1]["saved_bytes"] - saved[0.0]["saved_bytes"] == 1 * 2 * 16 * 64  # layers x batch x seq x width
    assert saved[0.1]["saved_count"] == saved[0.0]["saved_count"] + 1


def test_nlg_worker_fast_equals_every_position_loss():
    fast, full = (_worker("nlg", m, *NLG) for m in ("fast", "all"))
    assert fast["tokens_per_s"] > 0 and full["tokens_per_s"] > 0 and fast["tokens"] == full["tokens"]
    assert math.isclose(fast["losses"][0], full["losses"][0], rel_tol=1e-4)  # same model, same batch, same loss
    # synthetic batches: 50 tokens, the last 20 labelled; the fast head runs on those rows only
    assert full["head_rows"] == full["tokens"] and fast["head_rows"] == fast["tokens"] * 20 // 50


def test_render_reports_the_figures_of_a_real_run():
    """The report rendered from real tiny worker records shows each record's figures and each target's ratio."""
    have = {"ms": (bench.REPO / ".cache" / "loralib-0.1.2-py3-none-any.whl").exists(),
            "peft": importlib.util.find_spec("peft") is not None}
    methods = [m for m in bench.METHODS if have.get(m, True)]
    train = [_worker("train", m, *TRAIN) for m in methods]
    ours_p0 = _worker("train", "ours", *TRAIN[:-1], "0.0")
    nlg = [_worker("nlg", m, *NLG) for m in ("fast", "all")]
    for r in train + [ours_p0] + nlg:
        r.setdefault("round", 0)
    meta = dict(date_utc="now", command="x", wall_s=1, machine="m", loadavg_before=["0"], loadavg_after=["0"],
                versions={"torch": "t"}, model=dict(layers=1, width=D, heads=4, vocab=300, r=R, alpha=32, lr=1,
                                                    threads=1), rounds=1, warmup=1, steps=2, eval_reps=1)
    md = bench.render(dict(meta=meta, train=train + [ours_p0], nlg=nlg))
    rows = {line.split(" | ")[0][2:] + "@" + line.split(" | ")[1]: line for line in md.splitlines()
            if line.startswith("| ") and line.count(" | ") == 12}
    for r in train + [ours_p0]:
        lora = r["method"] in bench.LORA_METHODS
        row = rows[bench.LABELS[r["method"]] + "@" + (f"{r['dropout']:g}" if lora else "–")]
        assert f" | {r['params']['trainable']:,} | {r['adapter_bytes']:,} | " in row
        assert f" | {r['saved_bytes'] / 1e6:,.1f} | " in row
    by = {r["method"]: r for r in train}
    ours = by["ours"]
    diff = (ours["saved_bytes"] - ours_p0["saved_bytes"]) / 1e6
    mask = 1 * 2 * 16 * D  # layers x batch x seq x width: one bool per adapted input element
    row = f"| saved bytes, this: dropout 0.1 − dropout 0.0 = its bool mask ({mask / 1e6:.2f} MB) | {diff:+.2f} MB | "
    assert row + f"{'yes' if round(diff * 1e6) == mask else '**no**'} |" in md
    eval_ratio = ours["eval_median_s"]["unmerged"] / ours["eval_median_s"]["base"]
    met = "yes" if eval_ratio <= 1.05 else "**no**"
    assert f"| eval, this unmerged / base ≤ 1.05 | {eval_ratio:.3f} | {met} |" in md
    assert f"| {ours['merged_vs_unmerged_maxdiff']:.1e} |" in md
    if "peft" in by:
        step_ratio = ours["step_median_s"] / by["peft"]["step_median_s"]
        assert f"| step, this / peft ≤ 1.03 (dropout 0.1) | {step_ratio:.3f} | " \
               f"{'yes' if step_ratio <= 1.03 else '**no**'} |" in md
        gap = (by["peft"]["saved_bytes"] - ours["saved_bytes"]) / 1e6
        assert f"| saved bytes (dropout 0.1), peft − this ≥ 10 MB | {gap:.2f} MB | " in md
    fast, every = nlg
    assert f"Ratio fast / every position per round: {fast['tokens_per_s'] / every['tokens_per_s']:.2f} " in md
    assert f"{every['head_rows'] / fast['head_rows']:.2f}× fewer" in md


def test_bench_layer_table(capsys):
    import bench_layer  # on sys.path since bench_peers' import

    methods = "ours,peft" + (",ms" if (bench.REPO / ".cache" / "loralib-0.1.2-py3-none-any.whl").exists() else "")
    assert bench_layer.main(["--methods", methods, "--d_in", "16", "--d_out", "48", "--tokens", "2x4", "--warmup", "1",
                             "--reps", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["frozen base layer (no LoRA)"] + [
        bench.LABELS[m] for m in methods.split(",")]
    assert rows[1].split(" | ")[-1].strip(" |") == "1.000"  # this loralib against itself


def test_bench_layer_builds_the_adapters_it_names():
    """On one shared frozen layer: loralib adds two rank-r updates on q and v (k untouched), PEFT one on q|k|v."""
    import torch

    import bench_layer

    r = 4
    args = bench_layer.argparse.Namespace(methods="ours,peft", d_in=16, d_out=48, r=r, alpha=32, dropout=0.0,
                                          ms_wheel="")
    layers = bench_layer.build_layers(args)
    x = torch.randn(40, 16)  # more rows than the input width: a full-rank difference would show as rank 16
    base = layers["base"](x)
    ours = (layers["ours"](x) - base).detach()
    peft_diff = (layers["peft"](x) - base).detach()
    assert ours[:, 16:32].abs().max() == 0 and ours.abs().max() > 1e-4
    assert torch.linalg.matrix_rank(ours[:, :16]) == r and torch.linalg.matrix_rank(ours[:, 32:]) == r
    assert peft_diff.abs().max() > 1e-4 and torch.linalg.matrix_rank(peft_diff) == r


def test_benchmarks_never_import_from_tests():
    """Imports run one way: tests import benchmarks (the reference wheel's loader lives there), never the reverse."""
    test_modules = {f.stem for f in (bench.REPO / "tests").rglob("*.py")} - {"__init__"}
    for f in sorted((bench.REPO / "benchmarks").glob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not imported & test_modules, f"{f.name} imports {sorted(imported & test_modules)} from tests/"
        assert "tests" not in strings, f"{f.name} names the tests folder (a sys.path entry?)"


def test_bf16_workers_and_their_targets():
    """--precision bf16: frozen weights in bfloat16, trainable ones float32, and the bf16 targets of the report
    computed from these real (tiny) runs, paired by round."""
    pytest.importorskip("peft")
    import torch

    args = ("--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "0", "--eval_reps", "0")
    runs = {(m, prec): dict(_worker("train", m, *args, "--dropout", "0.0" if m == "floor" else "0.1",  # as planned
                                    "--precision", prec), round=0)
            for m, prec in (("ours", "fp32"), ("ours", "bf16"), ("peft", "bf16"), ("floor", "bf16"),
                            ("floor", "fp32"))}
    for (m, prec), r in runs.items():
        frozen = torch.bfloat16 if prec == "bf16" else torch.float32
        assert r["precision"] == prec and r["frozen_dtypes"] == [str(frozen)]
        assert all(math.isfinite(t) and t > 0 for t in r["step_s"])
    assert runs["ours", "bf16"]["params"] == runs["ours", "fp32"]["params"]  # the adapter itself is unchanged
    jobs = bench.plan_jobs(["floor", "ours", "peft"], [0.1, 0.0], False, "bf16")
    references = {("ours", 0.1, "fp32", True), ("floor", 0.0, "fp32", True)}
    assert references <= set(jobs) and all(j[2] == "bf16" for j in jobs if j not in references)
    assert [j for j in bench.plan_jobs(["ours", "peft"], [0.1], False, "bf16") if j[2] == "fp32"] == [
        ("ours", 0.1, "fp32", True)]  # no floor asked for, no floor reference

    meta = dict(date_utc="now", command="x", wall_s=1, machine="m", loadavg_before=["0"], loadavg_after=["0"],
                versions={"torch": "t"}, precision="bf16", rounds=1, warmup=0, steps=2, eval_reps=0,
                model=dict(layers=1, width=D, heads=4, vocab=300, r=R, alpha=32, lr=1e-3, threads=2))
    md = bench.render(dict(meta=meta, train=list(runs.values()), nlg=[]))
    step = {k: r["step_median_s"] for k, r in runs.items()}
    rows = dict(line.split(" | ")[:2] for line in md.splitlines() if line.startswith("| step"))
    ours_peft = step["ours", "bf16"] / step["peft", "bf16"]
    assert rows["| step bf16, this / peft ≤ 1.03 (dropout 0.1)"] == f"{ours_peft:.3f}"
    assert rows["| step, this bf16 / this fp32 ≤ 0.6"] == f"{step['ours', 'bf16'] / step['ours', 'fp32']:.3f}"
    assert rows["| step bf16, floor / peft (context)"] == f"{step['floor', 'bf16'] / step['peft', 'bf16']:.3f}"
    rss = {k: r["rss_delta"] for k, r in runs.items()}
    saved = {k: r["saved_bytes"] for k, r in runs.items()}
    rows = dict(line.split(" | ")[:2] for line in md.splitlines() if line.startswith(("| peak", "| saved")))
    assert (rows["| peak RSS over base, floor bf16 / floor fp32 (context: the bound for any adapter)"]
            == f"{rss['floor', 'bf16'] / rss['floor', 'fp32']:.3f}")
    assert rows["| saved activations, floor bf16 / floor fp32 (context)"] == (
        f"{saved['floor', 'bf16'] / saved['floor', 'fp32']:.3f}")
    added = {prec: saved["ours", prec] - saved["floor", prec] for prec in ("bf16", "fp32")}
    assert rows["| saved activations the adapter adds over the floor, bf16 / fp32 (context)"] == (
        f"{added['bf16'] / 1e6:.1f} / {added['fp32'] / 1e6:.1f} MB = {added['bf16'] / added['fp32']:.3f}")
    context = [line for line in md.splitlines() if line.startswith("| ") and "(context" in line.split(" | ")[0]]
    assert len(context) == 4 and all(line.endswith("| (context, no target) |") for line in context), context
    assert "| this loralib (bf16) | 0.1 |" in md and "| peft (bf16) | 0.1 |" in md


def test_bench_generate_table(tmp_path, capsys):
    """Both methods on the same tiny GPT-2 and the same prompts: a row per decoding and batch, tokens/s of each,
    greedy token ids identical to transformers' (no timing assertions)."""
    import bench_generate

    out = tmp_path / "gen.md"
    assert bench_generate.main(["--layers", "2", "--hidden", "32", "--heads", "4", "--vocab", "300", "--quick",
                                "--threads", "1", "--batch", "4", "--batches", "1,4",
                                "--data_dir", str(tmp_path / "none"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text().strip() in printed and "the 5 sample MRs of run_inference.py, repeated" in printed
    assert "; ours: packed weights; " in printed
    rows = [line.split(" | ") for line in printed.splitlines() if line.startswith("| greedy") or
            line.startswith("| beam 5")]
    assert [(r[0][2:], r[1], r[2]) for r in rows] == [("greedy", "1", "2"), ("greedy", "4", "4"),
                                                      ("beam 5, no-repeat 4-grams", "1", "2"),
                                                      ("beam 5, no-repeat 4-grams", "4", "4")]
    for r in rows:
        assert float(r[3]) > 0 and float(r[4]) > 0
    assert [r[-1].strip(" |") for r in rows[:2]] == ["2 of 2", "4 of 4"]


def test_bench_generate_counts_tokens_as_generated():
    import bench_generate

    assert bench_generate.n_tokens([[1, 2, 3], [4], []], new_tokens=3) == 3 + 2 + 1  # + each end-of-text
    with pytest.raises(SystemExit, match="--modes"):
        bench_generate.main(["--modes", "sampling"])


def test_bench_generate_explains_greedy_rows_that_differ():
    """A row whose ids differ gets where they part and both tokens' float64 logits from the model's own weights."""
    import torch

    import bench_generate
    from e2e_nlg.model import GPTConfig, build_model

    model = build_model(GPTConfig(vocab_size=50, max_positions=32, hidden_dim=16, num_layers=1, num_heads=2),
                        base_seed=3).eval()
    prompts, ours = [[4, 5, 6], [7, 8]], [[9, 10, 11], [1, 2]]
    notes = bench_generate.greedy_ties(model, prompts, ours, [[9, 10, 11], [1, 3, 4]], eos=49)
    with torch.no_grad():
        want = model.double()(torch.tensor([[7, 8, 1]])).logits[0, -1]
    assert len(notes) == 1 and notes[0].startswith("row 1: the same first 1 tokens, then ours 2, transformers' 3; ")
    assert f"their logits are {want[2]:.6f} and {want[3]:.6f}: " in notes[0]
    assert f"ahead by {abs(want[2] - want[3]).item():.1e}" in notes[0]


def test_bench_generate_on_a_llama_gguf(tmp_path, capsys):
    """--model with a Llama GGUF file: the example's Llama and transformers' LlamaForCausalLM read the same file,
    and greedy ids agree row by row; the header names the model the file holds (and --unpacked's F.linear)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "nlg"))
    from gguf_fixtures import write_tiny_llama

    import bench_generate

    path = tmp_path / "tiny.gguf"
    cfg, _ = write_tiny_llama(str(path), sizes={"context_length": 256})  # room for the sample prompts
    assert bench_generate.main(["--model", str(path), "--quick", "--threads", "1", "--batch", "4", "--batches", "4",
                                "--modes", "greedy", "--data_dir", str(tmp_path / "none"), "--unpacked"]) == 0
    printed = capsys.readouterr().out
    assert f"Llama architecture from GGUF, {cfg['n_layer']} layers, width {cfg['n_embd']}" in printed
    assert "; ours: F.linear; " in printed
    row = next(line.split(" | ") for line in printed.splitlines() if line.startswith("| greedy"))
    assert row[1:3] == ["4", "4"] and row[-1].strip(" |") == "4 of 4"


def test_bench_packed_linear_table(capsys):
    import torch

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    import bench_packed_linear

    assert bench_packed_linear.main(["--rows", "3", "--repeats", "1"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| GPT")
            or line.startswith("| Smol")]
    assert len(rows) == 10 and {r[1] for r in rows} == {"3"}
    assert all(float(r[-1].strip(" |")) < 1e-5 for r in rows)  # the same layer, summed in another order
