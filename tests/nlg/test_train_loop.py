"""The training settings declared once (TrainConfig's fields generate both scripts' parsers) and the one training loop
(e2e_nlg/train_loop.py) that run_training.py, compare_lora_vs_full.py and bench_peers' NLG worker share."""
import argparse
import ast
import dataclasses
import glob
import importlib.util
import os
import re

import pytest
import torch

import loralib as lora
import run_training
from conftest import NLG, tiny_args
from e2e_nlg.model import GPTConfig, build_model
from e2e_nlg.train_config import TrainConfig, add_flags
from e2e_nlg.train_loop import Hooks, Trainer, run_steps

REPO = os.path.abspath(os.path.join(NLG, "..", ".."))


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


compare = _load(os.path.join(NLG, "compare_lora_vs_full.py"), "compare_for_loop_tests")
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "recipe_info"}


def _actions(parser):
    # The declared flag of each setting (compare's --max_len, an earlier name of --seq_len, is an alias after it).
    actions = {}
    for a in parser._actions:
        if a.dest not in ("help", "_worker"):
            actions.setdefault(a.dest, a)
    return actions


# --- the flags: declared once, in TrainConfig's field metadata -------------------------------------------------------

def test_every_field_is_a_flag_with_its_help_choices_and_default():
    actions = _actions(run_training.get_parser())
    assert set(actions) == set(FIELDS)
    for name, f in FIELDS.items():
        a = actions[name]
        assert a.option_strings == [f"--{name}"] and a.default == f.default and a.help == f.metadata["help"]
        assert len(a.help) > 10, name
        assert a.choices == f.metadata["choices"], name
        if f.type is bool:
            assert isinstance(a, argparse._StoreTrueAction)
        else:
            assert a.type in (int, float, str), name
    assert actions["lr"].type is float and actions["seed"].type is int and actions["lora_alpha"].type is int
    assert actions["lora_targets"].nargs == "+"


@pytest.mark.parametrize("flag, bad", [("--precision", "fp8"), ("--train_refs", "some"), ("--adapter_format", "npz"),
                                       ("--dist_backend", "mpi"), ("--lora_targets", "ffn"), ("--recipe", "fast")])
def test_choices_are_enforced_by_both_parsers(flag, bad, capsys):
    with pytest.raises(SystemExit) as e:
        run_training.get_parser().parse_args([flag, bad])
    assert e.value.code == 2 and f"invalid choice: '{bad}'" in capsys.readouterr().err
    if flag == "--precision":  # the one of these that compare_lora_vs_full.py takes
        with pytest.raises(SystemExit):
            compare.parse_args([flag, bad])
        assert f"invalid choice: '{bad}'" in capsys.readouterr().err


def test_compare_takes_the_same_declarations_with_its_own_defaults(capsys):
    ours, theirs = _actions(compare.parse_args([])[1]), _actions(run_training.get_parser())
    assert set(compare.SHARED_FLAGS) <= set(ours)
    for name in compare.SHARED_FLAGS:
        a, b = ours[name], theirs[name]
        assert (a.option_strings, a.type, a.choices, type(a)) == (b.option_strings, b.type, b.choices, type(b))
        assert a.default == compare.DEFAULTS.get(name, FIELDS[name].default)
        assert a.help == compare.HELPS.get(name, FIELDS[name].metadata["help"])
    args, _ = compare.parse_args(["--seq_len", "48", "--lr", "0.5"])
    cfg = compare.train_config(args)
    assert (cfg.seq_len, cfg.lr, cfg.weight_decay, cfg.seed, cfg.recipe) == (48, 0.5, 0.01, 0, "none")
    with pytest.raises(SystemExit):
        compare.parse_args(["--help"])
    out = capsys.readouterr().out
    assert [n for n in ours if f"--{n}" not in out] == []
    assert "(default: 0.0002)" in out and "(default: 0.01)" in out


def test_add_flags_reports_an_unknown_field():
    with pytest.raises(KeyError):
        add_flags(argparse.ArgumentParser(), ["no_such_setting"])


def _declared_flags(path):
    """The literal option strings passed to ``add_argument`` in a file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    return [arg.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]


def test_the_shared_training_flags_are_written_nowhere_in_examples():
    """--lr, --seed, --lora_dim, --lora_alpha, --weight_decay exist as TrainConfig fields only: no script of
    examples/ declares them with add_argument (they are generated), yet both scripts take them."""
    shared = {"--lr", "--seed", "--lora_dim", "--lora_alpha", "--weight_decay"}
    files = glob.glob(os.path.join(REPO, "examples", "**", "*.py"), recursive=True)
    assert len(files) > 10
    assert {f: shared & set(_declared_flags(f)) for f in files if shared & set(_declared_flags(f))} == {}
    for parser in (run_training.get_parser(), compare.parse_args([])[1]):
        assert shared <= {s for a in parser._actions for s in a.option_strings}


def _function_source(path, name):
    src = open(path, encoding="utf-8").read()
    node = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(src, node)


def test_no_training_loop_outside_src_train_loop():
    """compare_lora_vs_full.py and bench_peers' NLG worker have no backward() of their own."""
    assert not re.search(r"\.backward\(", open(os.path.join(NLG, "compare_lora_vs_full.py")).read())
    bench = os.path.join(REPO, "benchmarks", "bench_peers.py")
    for name in ("worker_nlg", "nlg_step_times"):
        assert "backward(" not in _function_source(bench, name) and "opt.step" not in _function_source(bench, name)
    assert "run_steps(" in _function_source(bench, "worker_nlg")


# --- the loop -------------------------------------------------------------------------------------------------------

def _tiny(seed=0):
    torch.manual_seed(seed)
    model = build_model(GPTConfig(vocab_size=64, max_positions=16, hidden_dim=16, num_layers=1, num_heads=2,
                                  lora_dim=2, lora_alpha=4), base_seed=seed)
    lora.mark_only_lora_as_trainable(model)
    return model.train()


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (3, 10), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100
        labels[0, 8:] = -100  # rows with different token counts: the loss weights matter
        out.append({"input_ids": ids, "labels": labels})
    return out


class Recorder(Hooks):
    def __init__(self):
        self.calls = []

    def begin(self, step):
        self.calls.append(("begin", step))

    def forward_context(self, step):
        self.calls.append(("forward", step))
        return super().forward_context(step)

    def after_backward(self, step):
        self.calls.append(("after_backward", step))

    def after_update(self, step, result):
        self.calls.append(("after_update", step))

    def end(self, step, result):
        self.calls.append(("end", step, round(result.loss, 6), result.n_tok, result.tokens, len(result.losses)))


def test_hooks_are_called_in_order_for_each_step():
    model, batches = _tiny(), _batches(5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rec = Recorder()
    # 5 micro-batches, 2 per step: steps 3 and 4 of the range, then the data runs out in the middle of step 5
    assert run_steps(Trainer(model, opt, torch.device("cpu"), grad_accum=2), batches, 3, 10, rec) == 5
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["begin", "forward", "forward", "after_backward", "after_update", "end"] * 2
    assert [c[1] for c in rec.calls] == [3] * 6 + [4] * 6
    ends = [c for c in rec.calls if c[0] == "end"]
    n_tok = [sum(int((b["labels"][:, 1:] != -100).sum()) for b in pair) for pair in (batches[:2], batches[2:4])]
    assert [(c[3], c[4], c[5]) for c in ends] == [(n, 60, 2) for n in n_tok]


def test_the_loop_equals_a_plain_pytorch_loop_bit_for_bit():
    """One micro-batch per step, no clipping, no schedule: compare_lora_vs_full.py's steps, written out by hand."""
    batches = _batches(4)
    model = _tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    losses = []
    for b in batches:
        loss = model(b["input_ids"], labels=b["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model2 = _tiny()
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    hooks = compare.StepMeasures(model2, opt2, torch.device("cpu"))
    run_steps(Trainer(model2, opt2, torch.device("cpu")), batches, 0, len(batches), hooks)
    assert hooks.losses == losses
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    assert hooks.grad_bytes == sum(p.numel() * 4 for p in model2.parameters() if p.requires_grad)
    assert hooks.optimizer_state_bytes > 0 and hooks.saved.bytes > 0 and len(hooks.step_times) == 4


def test_accumulated_micro_batches_weigh_tokens_as_one_batch_would():
    batches = _batches(2)
    whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    grads = []
    for grad_accum, data in ((2, batches), (1, [whole])):
        model = _tiny()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        hooks = Hooks()
        hooks.after_backward = lambda step, m=model: grads.append(
            {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        run_steps(Trainer(model, opt, torch.device("cpu"), grad_accum=grad_accum), data, 0, 1, hooks)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_without_an_optimizer_the_loop_leaves_the_weights_alone():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = Recorder()
    run_steps(Trainer(model, None, torch.device("cpu")), _batches(1), 0, 1, rec)
    assert [c[0] for c in rec.calls] == ["begin", "forward", "after_backward", "end"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_a_step_without_tokens_to_learn_is_a_clear_error():
    b = _batches(1)[0]
    b["labels"][:] = -100
    model = _tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="step 1 has no completion tokens to learn.*raise --seq_len"):
        run_steps(Trainer(model, opt, torch.device("cpu")), [b], 0, 1)


# --- resume: the adapter through lora.load_adapter, then the training state -------------------------------------------

def test_resume_loads_the_adapter_through_the_library(e2e_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_training.main(tiny_args(e2e_dir, out, "--max_steps", "2")) == 0
    calls = []
    real = lora.load_adapter
    monkeypatch.setattr(lora, "load_adapter", lambda model, d, **kw: calls.append(d) or real(model, d, **kw))
    assert run_training.main(tiny_args(e2e_dir, out, "--max_steps", "3", "--resume")) == 0
    assert calls == [str(out)]


def test_resume_refuses_an_adapter_that_does_not_fit(e2e_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_training.main(tiny_args(e2e_dir, out, "--max_steps", "2")) == 0
    capsys.readouterr()
    # another rank: the library's load_adapter names the mismatch; nothing in out/ is overwritten
    before = {p: open(os.path.join(out, p), "rb").read() for p in os.listdir(out)}
    assert run_training.main(tiny_args(e2e_dir, out, "--max_steps", "3", "--resume", "--lora_dim", "2")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: layer mismatch: ") and err.count("\n") == 1
    assert f"has r=2 here but 4 in {out}; resume with the model flags" in err
    assert {p: open(os.path.join(out, p), "rb").read() for p in os.listdir(out)} == before
